"""Teacher worker: a Ray actor around one teacher model that scores and writes responses.

Two backends give the same `Scored` signal. `vllm` reads prompt log-probs (fast, top-k,
temperature 1). `transformers` runs a plain forward pass, so it scores at any
temperature and sees the full vocabulary; only the top-k leaves the actor either way,
since full-vocabulary logits would dwarf everything else moving through Ray.
"""

from __future__ import annotations

import numpy as np

from opd.rollout import engine as vllm_engine


class TeacherWorker:
    def __init__(self, model: str, backend: str, engine_cfg, temperature: float, seed: int) -> None:
        self.backend, self.temperature = backend, temperature
        if backend == "vllm":
            self.llm = vllm_engine.make_llm(model, engine_cfg, seed)
        else:
            import torch
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype="auto").to(device).eval()

    def ready(self) -> str:
        return self.backend

    def score(self, prompt_ids: list, response_ids: list, top_k: int) -> list[vllm_engine.Scored]:
        """Per response token: the teacher's log-prob of the student's token and its own top-k."""
        if self.backend == "vllm":
            return vllm_engine.score(self.llm, prompt_ids, response_ids, top_k)
        return [self._score_hf(p, r, top_k) for p, r in zip(prompt_ids, response_ids, strict=True)]

    def _score_hf(self, prompt, response, top_k: int) -> vllm_engine.Scored:
        import torch

        ids = torch.tensor([[*prompt, *response]], device=self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logprobs = torch.log_softmax(logits / self.temperature, dim=-1)
        top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        own = logprobs.gather(-1, ids[0, len(prompt) :, None])[:, 0]
        return vllm_engine.Scored(
            own.cpu().numpy().astype(np.float32), top.indices.cpu().numpy(), top.values.cpu().numpy()
        )

    def generate(self, prompt_ids: list, n: int, max_tokens: int, temperature: float, seed: int | None):
        """The teacher's own responses (offline KD data, teacher accuracy); same format as `engine.sample`."""
        if self.backend == "vllm":
            return vllm_engine.sample(self.llm, prompt_ids, n, max_tokens, temperature, seed)
        return [self._generate_hf(p, n, max_tokens, temperature, seed) for p in prompt_ids]

    def _generate_hf(self, prompt, n: int, max_tokens: int, temperature: float, seed: int | None):
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        ids = torch.tensor([list(prompt)] * n, device=self.model.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = self.model.generate(
            ids, max_new_tokens=max_tokens, output_scores=True, return_dict_in_generate=True, **sampling
        )
        eos = self.model.generation_config.eos_token_id
        pairs = []
        for i in range(n):
            tokens = out.sequences[i, len(prompt) :].tolist()
            lps = [float(torch.log_softmax(s[i].float(), -1)[t]) for s, t in zip(out.scores, tokens, strict=False)]
            if eos in tokens:
                cut = tokens.index(eos) + 1
                tokens, lps = tokens[:cut], lps[:cut]
            pairs.append((np.asarray(tokens, np.int64), np.asarray(lps, np.float32)))
        return pairs

"""Teacher worker: a Ray actor around one teacher model that scores and writes responses.

Three backends give the same `Scored` signal. `vllm` reads prompt log-probs (fast, top-k,
temperature 1). `transformers` runs a plain forward pass, so it scores at any
temperature and sees the full vocabulary; only the top-k leaves the actor either way,
since full-vocabulary logits would dwarf everything else moving through Ray. `openai` loads no model: it asks
a server elsewhere for the same prompt log-probs and samples over HTTP (`opd.teachers.served`), so the pool's
timeouts, retries and drops apply to a served teacher unchanged.

Everything crossing the actor boundary is in the student's tokens: a teacher with another
tokenizer renders each prompt's conversation with its own chat template (`TeacherPrompts`), re-tokenizes the
student's response text and projects its signal back (`TokenBridge`), so the rest of opd never knows which
teachers share the student's vocabulary. Calls carry each prompt (`Prompt`) beside
the student's ids for that.
"""

from __future__ import annotations

import numpy as np

from opd import devices
from opd.config import DataConfig
from opd.plan import Placed
from opd.rollout import engine as vllm_engine
from opd.teachers import hf
from opd.teachers.align import TokenBridge
from opd.teachers.prompts import TeacherPrompts
from opd.teachers.served import Endpoint, ServedClient, check_tokenizer, local_vocab_size


class TeacherWorker(Placed):
    def __init__(
        self,
        model: str,
        backend: str,
        engine_cfg,
        temperature: float,
        seed: int,
        student: str,
        top_k: int,
        data: DataConfig,
        endpoint: Endpoint | None = None,
    ) -> None:
        """`data`: the chat settings prompts are rendered with. `model` is a local dir: the checkpoint, or for
        backend=openai the served model's tokenizer, with `endpoint` saying where the model is served."""
        from transformers import AutoTokenizer

        self.backend, self.temperature = backend, temperature
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.stop_ids = vllm_engine.stop_token_ids(model)
        self.bridge = TokenBridge(AutoTokenizer.from_pretrained(student), self.tokenizer)
        self.prompts = TeacherPrompts(self.bridge, data)
        if backend == "openai":
            self.client = ServedClient(endpoint, local_vocab_size(model))
            self.max_len = self.client.max_model_len() or self.tokenizer.model_max_length
            check_tokenizer(endpoint, lambda text: self.tokenizer.encode(text, add_special_tokens=False), model)
        elif backend == "vllm":
            # vLLM refuses more prompt log-probs per token than max_logprobs (default 20).
            self.llm = vllm_engine.make_llm(model, engine_cfg, seed, max_logprobs=max(20, top_k))
            self.max_len = engine_cfg.max_model_len
        else:
            from transformers import AutoModelForCausalLM

            # On the GPUs Ray gave this replica (all of them when several), else the CPU.
            device_map = devices.hf_device_map(len(devices.assigned_gpus()))
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype="auto", device_map=device_map).eval()
            config = self.model.config
            self.max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)

    def ready(self) -> str:
        return self.backend

    def _prompt_ids(self, prompt_ids: list, prompts: list) -> list[list[int]]:
        return [self.prompts.ids(p, x) for p, x in zip(prompt_ids, prompts, strict=True)]

    def score(self, prompt_ids: list, response_ids: list, prompts: list, top_k: int) -> vllm_engine.ScoredBatch:
        """Per student response token: the teacher's log-prob of the student's token and its own top-k."""
        if self.bridge.same_vocab:
            return vllm_engine.ScoredBatch(s.compact() for s in self._score(prompt_ids, response_ids, top_k))
        contexts = self._prompt_ids(prompt_ids, prompts)
        bridged = [self.bridge.to_teacher(p, r) for p, r in zip(contexts, response_ids, strict=True)]
        scored = self._score([b.prompt_ids for b in bridged], [b.response_ids for b in bridged], top_k)
        return vllm_engine.ScoredBatch(
            self.bridge.project(b, s, top_k).compact() for b, s in zip(bridged, scored, strict=True)
        )

    def _score(self, prompt_ids: list, response_ids: list, top_k: int) -> list[vllm_engine.Scored]:
        if self.backend == "openai":
            return self.client.score(prompt_ids, response_ids, top_k)
        if self.backend == "vllm":
            return vllm_engine.score(self.llm, prompt_ids, response_ids, top_k)
        return hf.score(self.model, prompt_ids, response_ids, top_k, self.temperature)

    def generate(
        self, prompt_ids: list, prompts: list, n: int, max_tokens: int, temperature: float, seed: int | None
    ) -> list:
        """The teacher's own responses to the prompts (offline KD data, teacher accuracy).

        Same format as `engine.sample`, in student tokens. A teacher with another tokenizer answers its own
        rendering of the prompt and writes text that is re-tokenized for the student; its per-token log-probs
        then have no student-token meaning and are NaN.
        """
        if self.bridge.same_vocab:
            return self._generate(prompt_ids, n, max_tokens, temperature, seed)
        outs = self._generate(self._prompt_ids(prompt_ids, prompts), n, max_tokens, temperature, seed)
        student = [[self.bridge.to_student_text_ids(list(ids)) for ids, _ in pairs] for pairs in outs]
        return [[(np.asarray(ids, np.int64), np.full(len(ids), np.nan, np.float32)) for ids in per] for per in student]

    def _generate(self, prompt_ids: list, n: int, max_tokens: int, temperature: float, seed: int | None):
        """Responses in the teacher's own tokens."""
        if self.backend == "openai":
            return self.client.sample(prompt_ids, n, max_tokens, temperature, seed, self.stop_ids)
        if self.backend == "vllm":
            return vllm_engine.sample(self.llm, prompt_ids, n, max_tokens, temperature, seed, self.stop_ids)
        return hf.sample(self.model, prompt_ids, n, max_tokens, temperature, seed, self.stop_ids)

    def complete(self, texts: list[str], max_tokens: int, temperature: float) -> list[str | None]:
        """The teacher's text answer to each text as a user turn in its chat template (a judge's rubric)."""
        return self._answer_text([self.prompts.user_turn(t) for t in texts], max_tokens, temperature)

    def answer(self, prompt_ids: list, prompts: list, max_tokens: int, temperature: float) -> list[str | None]:
        """The teacher's text answer to each prompt as it reads it (combine.rule=best_of's answers)."""
        return self._answer_text(self._prompt_ids(prompt_ids, prompts), max_tokens, temperature)

    def _answer_text(self, ids: list[list[int]], max_tokens: int, temperature: float) -> list[str | None]:
        """One decoded response per teacher-token prompt.

        None for a prompt that leaves no room for `max_tokens` in the teacher's context (never truncated:
        a judge reading half a rubric would give a verdict on something else).
        """
        fits = [i for i, x in enumerate(ids) if len(x) + max_tokens <= self.max_len]
        outs = self._generate([ids[i] for i in fits], 1, max_tokens, temperature, None) if fits else []
        result: list[str | None] = [None] * len(ids)
        for i, pairs in zip(fits, outs, strict=True):
            result[i] = self.tokenizer.decode(pairs[0][0], skip_special_tokens=True)
        return result

    def continue_response(
        self, prompt_ids: list, prefixes: list, budgets: list[int], prompts: list, temperature: float, seed: int | None
    ) -> list[np.ndarray]:
        """A correction: the teacher writes the rest of each response after the kept student prefix.

        Inputs and outputs are student token ids (the prompt as the teacher reads it, the prefix through its
        text); the continuation is cut to its budget of student tokens.
        """
        contexts = [
            self.bridge.prefix_for_teacher(p, list(x))
            for p, x in zip(self._prompt_ids(prompt_ids, prompts), prefixes, strict=True)
        ]
        # One batched call at the largest budget; each continuation is then cut to its own.
        outs = self._generate(contexts, 1, max(budgets), temperature, seed)
        return [
            np.asarray(self.bridge.to_student_text_ids(list(pairs[0][0]))[:budget], dtype=np.int64)
            for pairs, budget in zip(outs, budgets, strict=True)
        ]

"""One DeepSpeed ZeRO data-parallel rank of the student, run as a Ray actor (one per device)."""

from __future__ import annotations

import math
import os
import socket
import time
from functools import partial
from typing import TYPE_CHECKING

import torch

from opd import devices
from opd.buffer.sample import Sample
from opd.learner import chunked, guard, lora, micro_batches, objective
from opd.learner.batch import collate, first_scored
from opd.learner.lr_schedule import lr_factor
from opd.plan import Placed

if TYPE_CHECKING:
    from vllm.distributed.weight_transfer import WeightSource


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def load_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the student is loaded in: the one it trains in. DeepSpeed casts a bf16 run's module to bf16 before
    its optimizer makes the fp32 master copy from it, so an fp32 load only held a whole fp32 model per shard in host
    memory for nothing (a CPU shard trains, and loads, in fp32)."""
    return torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32


def partitioned_loading(ds_config: dict):
    """Under ZeRO-3, the `HfDeepSpeedConfig` that makes transformers' `from_pretrained` build the student inside
    `deepspeed.zero.Init(config_dict_or_path=ds_config)` while it is alive (transformers 5.19, `modeling_utils`):
    each parameter is created on the shard's device in the config's dtype and partitioned as its module is built,
    and the checkpoint is copied in one gathered module at a time, so no rank ever holds the whole model. None for
    stages 0-2, which replicate the weights anyway."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


class LearnerShard(Placed):
    """Trains its slice of every batch; rank 0 also publishes weights to the rollout workers."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        model: str,
        learner_cfg,
        loss_cfg,
        temperature: float,
        sft_weight: float,
        max_nonfinite_steps: int,
        colocate: bool = False,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.model_path, self.cfg, self.loss_cfg, self.temperature = model, learner_cfg, loss_cfg, temperature
        self.sft_weight = sft_weight
        self.colocate = colocate
        """Shares its GPU with a rollout engine that wakes after the step: the allocator's cache is handed back."""
        self.nonfinite = guard.SkipCounter(max_nonfinite_steps)
        self.step = 0
        self.lora = False
        """The student carries LoRA adapters (`learner.lora.rank` > 0; set in `setup`, where they are added)."""
        self.transfer = None
        self.backend = ""
        self.client = None
        """The rollout group's weight-sync client (`init_weight_transfer`); carries the version of each send."""

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 names the address every rank meets at."""
        return node_address(), free_port()

    def setup(self, address: str, port: int, samples_per_shard: int, total_steps: int) -> int:
        """Join the process group and build the DeepSpeed engine; `total_steps` (rounds x mini_batches) is the
        length the lr schedule spans."""
        import deepspeed

        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(self.rank))
        os.environ.update(WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        # From what the shard reserved: CUDA visible to a 0-GPU shard is its node's, not its own.
        gpus = self.cfg.gpus_per_shard
        deepspeed.init_distributed(dist_backend=devices.learner_backend(self.cfg.backend, gpus))
        self.accum = math.ceil(samples_per_shard / self.cfg.micro_batch_size)
        ds_config = {
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
            "gradient_accumulation_steps": self.accum,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "bf16": {"enabled": devices.learner_bf16(self.cfg.bf16, gpus)},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        # A shard sharing its GPU loads after (or before) the engines there, never while one profiles its memory.
        with devices.one_start_per_gpu(devices.assigned_gpus()):
            self.engine = self.build_engine(ds_config, total_steps)
        return self.rank

    def build_engine(self, ds_config: dict, total_steps: int):
        """The student (with LoRA adapters if configured), its AdamW and lr schedule, wrapped by DeepSpeed."""
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._hf_ds = partitioned_loading(ds_config)  # alive while the engine is: transformers holds a weakref
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=load_dtype(ds_config))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.cfg.gradient_checkpointing:  # acts in train mode only, and from_pretrained leaves eval mode
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        self.lora = self.cfg.lora.rank > 0
        if self.lora:
            model = lora.wrap(model, self.cfg.lora)
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: only the adapters
        optim = torch.optim.AdamW(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        # Given to DeepSpeed, the scheduler is stepped after each optimizer step and saved in save_state.
        factor = partial(
            lr_factor,
            total_steps=total_steps,
            schedule=self.cfg.lr_schedule,
            warmup_steps=self.cfg.warmup_steps,
            min_lr_ratio=self.cfg.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optim, factor)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=scheduler, config=ds_config)
        return engine

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One optimizer step on this shard's slice: its micro-batches (`micro_batches.split`), then DeepSpeed's
        all-reduce/step."""
        t0 = time.perf_counter()
        lr = float(self.engine.get_lr()[0])  # this step's: the scheduler moves it only after the step
        loss_fn = objective.OBJECTIVES.get(self.loss_cfg.type)
        chunks = micro_batches.split(samples, self.cfg)
        packed = bool(self.cfg.max_tokens_per_micro_batch)
        if packed:  # empty micro-batches keep every rank's collectives in step
            chunks += [[]] * (micro_batches.agreed_count(len(chunks), self.engine.device) - len(chunks))
        elif len(chunks) != self.accum:
            raise ValueError(f"shard {self.rank} got {len(samples)} samples, set up for {self.accum} micro-batches")
        total_tokens = sum(s.num_tokens for s in samples)
        sums: dict[str, float] = {}
        skipped = False
        for i, chunk in enumerate(chunks):
            if packed:  # their number varies by step: DeepSpeed is told which one ends it
                self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            # An empty micro-batch runs the first sample at weight 0.
            batch = {
                k: v.to(self.engine.device)
                for k, v in collate(chunk or samples[:1], self.tokenizer.pad_token_id, self.loss_cfg.top_k).items()
            }
            loss, metrics, logits = self.micro_batch_loss(batch, loss_fn)
            if not guard.finite_everywhere(loss.detach()):  # every rank gets the same verdict
                loss, skipped = guard.safe_loss(loss, logits, finite=False), True
            # Objectives average over their micro-batch's tokens; reweight so the step is a
            # token mean over the whole shard batch (DeepSpeed divides by `accum` itself).
            weight = sum(s.num_tokens for s in chunk) / total_tokens * self.accum
            self.engine.backward(loss * weight)
            # The last micro-batch's step() is the optimizer step: with lr 0 if any micro-batch was non-finite.
            with guard.frozen_lr(self.engine.optimizer, skipped and i == len(chunks) - 1):
                self.engine.step()
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v * weight / self.accum
        self.nonfinite.update(skipped)
        sums |= {"nonfinite_skipped_steps": float(self.nonfinite.total)}
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        sums |= {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        sums |= {"learner_step_s": time.perf_counter() - t0, "tokens": float(total_tokens), "lr": lr}
        if self.colocate and torch.cuda.is_available():
            torch.cuda.empty_cache()  # else the step's peak stays reserved and the waking engine finds no room
        return sums

    def micro_batch_loss(self, batch: dict[str, torch.Tensor], loss_fn) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(loss, metrics, logits for the guard's check) of one micro-batch, from full logits or chunk by chunk."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        # The loss starts at the first position any row scores: before it, every row predicts prompt tokens, and
        # no LM head, log-softmax or loss is spent there.
        first, width = first_scored(batch), batch["input_ids"].shape[1]
        scored = chunked.chunk_batch(batch, first, width - 1)
        if not self.cfg.loss_chunk_tokens:
            # One float32 copy of the logits for the objective and the corrections: under bf16 each `.float()` would
            # be another [batch, positions, vocab] tensor held until the backward pass.
            logits = self.engine(**inputs, logits_to_keep=width - first).logits[:, :-1].float()
            loss, metrics = loss_fn(logits, scored, self.loss_cfg, self.temperature)
            return *objective.with_corrections(loss, metrics, logits, scored, self.sft_weight), logits
        # The LM head runs per chunk of positions (opd/learner/chunked.py); the last position's logits, which every
        # weight produced, are all the guard checks.
        out = self.engine(**inputs, logits_to_keep=1, output_hidden_states=True)
        hidden, head = out.hidden_states[-1][:, first:-1], self.engine.module.get_output_embeddings()
        args = (self.loss_cfg, self.temperature, self.sft_weight, self.cfg.loss_chunk_tokens)
        return *chunked.loss(hidden, head, scored, *args), out.logits

    def init_weight_transfer(self, address: str, port: int, world_size: int, rollout_handles: list, backend: str):
        """Join the learner->rollout transfer group (rank 0 sends; other ranks only help gather), leaving the
        previous one first (a replaced rollout group): its communicator and store would otherwise leak."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        from opd.rollout import weight_sync

        if self.transfer is not None:
            self.transfer.shutdown()
            self.transfer = None
        ranks_per_engine = (world_size - 1) // max(len(rollout_handles), 1)
        client = weight_sync.RolloutGroupClient(rollout_handles, ranks_per_engine)
        source = self.weight_source()
        largest = max(math.prod(m.shape) * m.dtype.itemsize for m in source.metadata())
        info = weight_sync.trainer_init_info(backend, self.rank, address, port, world_size, largest)
        self.client, self.backend = client, backend
        self.transfer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)

    def weight_source(self) -> WeightSource:
        """The student's weights under the base model's names: with LoRA, merged (every weight is sent, the
        adapted ones as W + scale * B @ A)."""
        from opd.learner.weights import MergedSource, ZeroWeightSource  # vLLM's code: the driver never imports it

        module = self.engine.module
        return MergedSource(module) if self.lora else ZeroWeightSource(module)

    def send_weights(self) -> dict[str, float]:
        t0 = time.perf_counter()
        from opd.rollout import weight_sync

        self.client.version = self.step  # the workers take it up with the weights
        if self.backend == "nccl":
            weight_sync.send_within(self.transfer, weight_sync.NCCL_SEND_TIMEOUT_S)
        else:  # gloo's group times out by itself; ipc waits on no peer over the wire
            weight_sync.send_and_finish(self.transfer)
        seconds = time.perf_counter() - t0
        nbytes = sum(math.prod(m.shape) * m.dtype.itemsize for m in self.transfer.source.metadata())
        return {
            "weight_sync_s": seconds,
            "weight_sync_gb": nbytes / 1e9,
            "weight_sync_gb_per_s": nbytes / seconds / 1e9,
            "version": self.step,
        }

    def save_state(self, path: str) -> None:
        """DeepSpeed checkpoint (model, optimizer and ZeRO partitions of every rank; each rank writes its part)."""
        self.engine.save_checkpoint(path, tag="state", client_state={"step": self.step})

    def load_state(self, path: str) -> int:
        """Restore a `save_state` checkpoint; returns the learner step (policy version) it was taken at."""
        _, client = self.engine.load_checkpoint(path, tag="state")
        if client is None:
            raise FileNotFoundError(f"no learner checkpoint under {path}")
        self.step = int(client["step"])
        return self.step

    def save(self, path: str) -> None:
        """Write a Hugging Face checkpoint of the full student; rank 0 writes. Every rank gathers one layer at a
        time (a collective), so no device ever holds the whole model; rank 0 keeps each layer's CPU copy. With
        LoRA the checkpoint holds the merged weights (the base architecture, no PEFT wrapper) and `adapter/`
        the adapter alone."""
        module = self.engine.module
        source = self.weight_source()
        gathered: dict[int, torch.Tensor] = {}  # id(parameter) -> its full CPU copy (tied weights share one)
        for names, tensors in source.iter_groups():
            if self.rank == 0:
                gathered |= {
                    id(source.params[n]): t.detach().cpu().clone() for n, t in zip(names, tensors, strict=True)
                }
        if self.lora:
            lora.save_adapter(module, os.path.join(path, "adapter"), write=self.rank == 0)
            module, state = lora.base_state(module)
        else:
            state = module.state_dict(keep_vars=True)
        if self.rank == 0:
            state = {k: gathered[id(v)] if id(v) in gathered else v.detach().cpu().clone() for k, v in state.items()}
            module.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)

"""The student's weights as vLLM's weight-transfer engines want them: named tensors, one decoder layer at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from vllm.distributed.weight_transfer import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.base import layerwise_groups

from opd.learner.lora import ADAPTER, base_name, is_adapter


class ZeroWeightSource(WeightSource):
    """The student's parameters, gathered one decoder layer at a time.

    Under ZeRO-3 each parameter is partitioned across ranks; gathering a whole layer per
    step is a collective every rank joins, so memory stays bounded by one layer and the
    wire sees layer-sized messages. Subclasses send other tensors for the same names (`tensor`), gathering
    what those need with them (`also_gathered`).
    """

    reached = 0
    """Groups of the current iteration whose gather this rank has joined (`finish_after_failure`)."""
    broken = False
    """A gather itself failed (a peer rank gone): nothing is left to join."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = dict(module.named_parameters())

    def metadata(self) -> list[ParamMeta]:
        """Every parameter in send order: the layer groups', which iteration follows. vLLM's NCCL receiver takes
        the tensors in this order, and `named_parameters` may differ from it (layerwise_groups puts un-indexed
        weights registered between layers after them, and layers in index order)."""
        ordered = [(n, self.params[n]) for group in layerwise_groups(list(self.params)) for n in group]
        return [ParamMeta(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in ordered]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for names, tensors in self.iter_groups():
            yield from zip(names, tensors, strict=True)

    def start_send(self) -> None:
        """A send begins: none of its gathers joined yet (a send that fails before its first one owes them all)."""
        self.reached, self.broken = 0, False

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        self.start_send()
        for names in self.groups():
            params = [self.params[n] for n in names]
            self.reached += 1
            with self.gathered(params + self.also_gathered(names)):
                yield names, [self.tensor(n, p) for n, p in zip(names, params, strict=True)]

    @contextlib.contextmanager
    def gathered(self, params: list[torch.Tensor]) -> Iterator[None]:
        """ZeRO-3's gather of `params` (a collective every rank joins), released on exit (locally)."""
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        try:
            gather.__enter__()
        except BaseException:
            self.broken = True
            raise
        try:
            yield
        finally:
            gather.__exit__(None, None, None)

    def finish_after_failure(self) -> int:
        """After a send stopped part-way (its transfer group aborted, a receiver gone), join the gathers of the
        groups it never reached: every other learner rank goes through them all, and would otherwise wait in
        the next one until the collective's timeout, with the learner unable to take any call. How many."""
        if self.broken:
            return 0
        left = self.groups()[self.reached :]
        for names in left:
            with self.gathered([self.params[n] for n in names] + self.also_gathered(names)):
                pass
        self.reached += len(left)
        return len(left)

    def also_gathered(self, names: list[str]) -> list[torch.Tensor]:
        """Parameters besides `names`' own that `tensor` reads (none here)."""
        return []

    def tensor(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """What is sent for `name`: the parameter itself."""
        return param.data


class MergedSource(ZeroWeightSource):
    """The merged student as vLLM's transfer engines want it, one decoder layer at a time.

    Under ZeRO-3 every rank gathers a layer's base weights and adapters together (a collective) and computes
    that layer's merged weights; memory stays bounded by a layer. Unadapted weights pass through as they are.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        self.params = {base_name(n): p for n, p in model.named_parameters() if not is_adapter(n)}
        """Base name -> the base parameter (for an adapted layer, its frozen original)."""
        self.layers = {
            base_name(f"{n}.base_layer.weight"): m for n, m in model.named_modules() if isinstance(m, LoraLayer)
        }
        """Base name of each adapted weight -> its LoRA layer."""

    def also_gathered(self, names: list[str]) -> list[torch.Tensor]:
        """The adapters of the adapted layers among `names`, gathered with their base weights."""
        adapted = [self.layers[n] for n in names if n in self.layers]
        return [w for layer in adapted for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]

    def tensor(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """W + scale * B @ A for an adapted weight (PEFT's own delta: fan-in/fan-out aware), else W itself."""
        layer = self.layers.get(name)
        with torch.no_grad():
            if layer is None:
                return param.data
            return param.data + layer.get_delta_weight(ADAPTER).to(param.dtype)

"""The student's weights as vLLM's weight-transfer engines want them: named tensors, one decoder layer at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from vllm.distributed.weight_transfer import ParamMeta, WeightSource


class ZeroWeightSource(WeightSource):
    """The student's parameters, gathered one decoder layer at a time.

    Under ZeRO-3 each parameter is partitioned across ranks; gathering a whole layer per
    step is a collective every rank joins, so memory stays bounded by one layer and the
    wire sees layer-sized messages. Subclasses send other tensors for the same names (`tensor`), gathering
    what those need with them (`also_gathered`).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = dict(module.named_parameters())

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self.params.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for names, tensors in self.iter_groups():
            yield from zip(names, tensors, strict=True)

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        import deepspeed

        for names in self.groups():
            params = [self.params[n] for n in names]
            with deepspeed.zero.GatheredParameters(params + self.also_gathered(names), modifier_rank=None):
                yield names, [self.tensor(n, p) for n, p in zip(names, params, strict=True)]

    def also_gathered(self, names: list[str]) -> list[torch.Tensor]:
        """Parameters besides `names`' own that `tensor` reads (none here)."""
        return []

    def tensor(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """What is sent for `name`: the parameter itself."""
        return param.data

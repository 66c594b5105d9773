"""LoRA on the student (PEFT): only the adapters train, while the rollout engines and the saved student get the
merged weights W + scale * B @ A under the base model's parameter names (what vLLM's `load_weights` and
transformers expect). The merge is computed per layer as it is sent; the trained model is never merged in place,
which would fold the adapters into the frozen base and change what trains."""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER = "default"
"""PEFT's name for the one adapter the learner trains."""
PEFT_PREFIX = "base_model.model."


def wrap(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """`model` with LoRA adapters (`learner.lora`) on `cfg.target_modules`; only the adapters require grad."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    peft_cfg = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)


def is_adapter(name: str) -> bool:
    """PEFT's own test for a LoRA parameter (lora_A, lora_B, embeddings' and DoRA's)."""
    return "lora_" in name


def base_name(name: str) -> str:
    """The base model's name for a parameter of the PEFT-wrapped model (`base_layer` is the adapted original)."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def base_state(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The transformers model inside the PEFT wrapper, and its state dict (parameters kept as such, so callers can
    match them by identity) under the base names, adapters left out: what a merged checkpoint holds."""
    base = model.get_base_model()
    state = {base_name(k): v for k, v in base.state_dict(keep_vars=True).items() if not is_adapter(k)}
    return base, state


def save_adapter(model: torch.nn.Module, path: str | Path, write: bool) -> None:
    """Write the adapter alone (PEFT's `save_pretrained`: adapter_config.json + weights) to `path` if `write`.
    Every rank must call it: under ZeRO-3 the adapters are gathered (a collective) first."""
    import deepspeed

    adapters = {n: p for n, p in model.named_parameters() if is_adapter(n)}
    with deepspeed.zero.GatheredParameters(list(adapters.values()), modifier_rank=None):
        state = {n: p.data.detach().cpu().clone() for n, p in adapters.items()} if write else {}
    if write:
        model.save_pretrained(str(path), state_dict=state)

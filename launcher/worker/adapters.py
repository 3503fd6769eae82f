"""What gets trained: a LoRA adapter through peft, or every parameter."""

from __future__ import annotations

import torch

from launcher.config import Adapter, Full, Lora


def apply_adapter(model: torch.nn.Module, adapter: Adapter, *, task_type: str, heads: list[str]) -> torch.nn.Module:
    """Wrap `model` for `adapter`. `heads` (e.g. the classifier) are always trained in full."""
    if isinstance(adapter, Full):
        model.requires_grad_(True)
        return model
    assert isinstance(adapter, Lora)
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    config = LoraConfig(
        task_type=task_type,
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        modules_to_save=[h for h in heads if h in present],
    )
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

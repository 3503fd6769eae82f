"""The optimizer (torch AdamW, bitsandbytes 8-bit or paged 8-bit AdamW, DeepSpeed CPU Adam) with weight decay on
matrices only, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from launcher.choices import AdamW8bit, CpuAdam, Optimizer, PagedAdamW8bit
from launcher.choices.optimizers import decays
from launcher.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split so biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p.ndim) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


BETAS, EPS = (0.9, 0.999), 1e-8


# Rewrites param groups for an optimizer whose kernels take plain tensors only, returning the new groups and a
# function to call with the built optimizer (e.g. to hand gradients over each step). Strategies whose parameters
# are not plain tensors (FSDP2's DTensors) supply one; see EngineInputs.make_optimizer.
PlainGroups = Callable[[list[dict]], tuple[list[dict], Callable[[torch.optim.Optimizer], None]]]


def build_optimizer(
    model: torch.nn.Module, train: TrainConfig, choice: Optimizer, plain_groups: PlainGroups | None = None
) -> torch.optim.Optimizer:
    groups = param_groups(model, train.weight_decay)
    if isinstance(choice, AdamW8bit):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if isinstance(choice, PagedAdamW8bit) else bnb.optim.AdamW8bit
        attach = None
        if plain_groups is not None:  # bitsandbytes' 8-bit kernels take plain tensors only
            groups, attach = plain_groups(groups)
        opt = cls(groups, lr=train.lr, betas=BETAS, eps=EPS, min_8bit_size=choice.min_8bit_size)
        if attach is not None:
            attach(opt)
        return opt
    if isinstance(choice, CpuAdam):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=BETAS, eps=EPS, adamw_mode=True)
    # The fused kernel exists for CUDA tensors only. On CPU torch steps one tensor at a time (its default there):
    # foreach would make every tensor's temporaries at once (launcher/planning/rows.py: step_bytes).
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=train.lr, betas=BETAS, eps=EPS, fused=fused or None)


def lr_factor(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step `s` (0-based): linear warmup, then the decay."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(opt: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    warmup = math.ceil(train.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(total_steps, warmup, train.schedule))

"""The optimizer (torch AdamW, bitsandbytes 8-bit or paged 8-bit AdamW, DeepSpeed CPU Adam) with weight decay on
matrices only, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from launcher.config import AdamW8bit, CpuAdam, Optimizer, PagedAdamW8bit, TrainConfig

NO_DECAY = ("bias", "norm", "layernorm", "ln_")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split so biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


BETAS, EPS = (0.9, 0.999), 1e-8


def build_optimizer(model: torch.nn.Module, train: TrainConfig, choice: Optimizer) -> torch.optim.Optimizer:
    groups = param_groups(model, train.weight_decay)
    if isinstance(choice, AdamW8bit):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if isinstance(choice, PagedAdamW8bit) else bnb.optim.AdamW8bit
        groups, pairs = _local_shards(groups)
        opt = cls(groups, lr=train.lr, betas=BETAS, eps=EPS, min_8bit_size=choice.min_8bit_size)
        if pairs:
            _hand_over_gradients(opt, pairs)
        return opt
    if isinstance(choice, CpuAdam):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=BETAS, eps=EPS, adamw_mode=True)
    # The fused kernel exists for CUDA tensors only; foreach is the fast path on CPU.
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=train.lr, betas=BETAS, eps=EPS, fused=fused or None)


def _local_shards(groups: list[dict]) -> tuple[list[dict], list[tuple[torch.Tensor, torch.Tensor]]]:
    """FSDP2 parameters are DTensors, which bitsandbytes' kernels cannot take. Give the optimizer plain
    parameters sharing each local shard's storage instead (an update to one is an update to the other)."""
    from torch.distributed.tensor import DTensor

    pairs = []
    out = []
    for group in groups:
        params = []
        for p in group["params"]:
            if isinstance(p, DTensor):
                local = torch.nn.Parameter(p._local_tensor, requires_grad=True)
                pairs.append((p, local))
                params.append(local)
            else:
                params.append(p)
        out.append({**group, "params": params})
    return out, pairs


def _hand_over_gradients(opt: torch.optim.Optimizer, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Before each step the local parameters get the (already clipped) local gradient shards; after it both are
    cleared, since `zero_grad` only sees the optimizer's own parameters."""

    def before(*_):
        for sharded, local in pairs:
            local.grad = sharded.grad._local_tensor if sharded.grad is not None else None

    def after(*_):
        for sharded, local in pairs:
            sharded.grad = None
            local.grad = None

    opt.register_step_pre_hook(before)
    opt.register_step_post_hook(after)


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

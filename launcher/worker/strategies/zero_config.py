"""The DeepSpeed JSON for a run, built from our typed config (pure: no deepspeed import, used by --dry-run)."""

from __future__ import annotations

from typing import Any

from launcher.config import RunConfig, Zero


def _offload(device: str, cfg: Zero, pin_memory: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"device": device, "pin_memory": pin_memory}
    if device == "nvme":
        out["nvme_path"] = cfg.offload_dir
    return out


def deepspeed_config(
    cfg: RunConfig, world_size: int, cuda: bool = False, hidden_size: int | None = None
) -> dict[str, Any]:
    strategy = cfg.strategy
    assert isinstance(strategy, Zero)
    t = cfg.train
    zero: dict[str, Any] = {"stage": strategy.stage}
    if hidden_size:
        # Buckets sized to the model (as the transformers integration's "auto" does). DeepSpeed's fixed defaults
        # (5e8 elements) hold a small model's every gradient in one bucket until backward ends, so ZeRO-2 would
        # keep whole gradients like ZeRO-1; these reduce (and free) them a few layers at a time.
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        if strategy.stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if strategy.offload_optimizer != "none":
        # Pinned host memory speeds up GPU<->CPU copies; without a GPU there is nothing to pin for.
        zero["offload_optimizer"] = _offload(strategy.offload_optimizer, strategy, cuda)
    if strategy.offload_params != "none":
        zero["offload_param"] = _offload(strategy.offload_params, strategy, cuda)
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # loss_scale 0 = dynamic: start at 2**16, halve on overflow (the step is skipped), grow after 1000 good ones.
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
        },
        # Our AdamW / 8-bit optimizers are passed in as client optimizers; DeepSpeed only vouches for its own list.
        "zero_allow_untested_optimizer": True,
        # Progress and metrics are ours; keep DeepSpeed's periodic prints out of the way.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }

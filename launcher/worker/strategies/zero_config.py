"""The DeepSpeed JSON for a run, built from our typed config (pure: no deepspeed import, used by --dry-run)."""

from __future__ import annotations

from typing import Any

from launcher.config import RunConfig, Zero


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    assert isinstance(cfg.strategy, Zero)
    t = cfg.train
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": cfg.strategy.stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        # Our AdamW is passed in as a client optimizer; DeepSpeed only vouches for its own list.
        "zero_allow_untested_optimizer": True,
        # Progress and metrics are ours; keep DeepSpeed's periodic prints out of the way.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }

"""The DeepSpeed JSON for a run, built from our typed config (pure: no deepspeed import, used by --dry-run)."""

from __future__ import annotations

from typing import Any

from launcher.choices import Zero
from launcher.config import RunConfig


def _offload(device: str, cfg: Zero, pin_memory: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"device": device, "pin_memory": pin_memory}
    if device == "nvme":
        out["nvme_path"] = cfg.offload_dir
    return out


def deepspeed_config(
    cfg: RunConfig,
    world_size: int,
    cuda: bool = False,
    hidden_size: int | None = None,
    block_numel: int | None = None,
) -> dict[str, Any]:
    """`hidden_size` and `block_numel` (the largest transformer block's elements as DeepSpeed counts them: a packed
    4-bit weight by its packed elements) size the buckets and ZeRO-3's live parameters to the model; without them
    (a dry run, which has no model) DeepSpeed's defaults stand."""
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
    if strategy.stage == 3 and block_numel:
        # DeepSpeed keeps up to 1e9 gathered elements live, and any it will reuse within 1e9: a whole 1B model (or
        # the 4-bit layers and vocabulary matrices of an 8B one) stays gathered on every rank through forward and
        # backward. One block's worth keeps a rank at its partitions plus the block in use, like FSDP's reshard
        # after forward, and still keeps a block gathered from its recomputation to its backward under activation
        # checkpointing. (ZeroEngine waits for prefetches left in flight before it gathers anything itself.)
        zero["stage3_max_live_parameters"] = block_numel
        zero["stage3_max_reuse_distance"] = block_numel
        # The optimizer steps one sub-group of this rank's flat partition at a time, with an fp32 copy of its
        # gradients and the optimizer's temporaries sized to it. DeepSpeed's 1e9 makes a 1B model's whole
        # partition one group: a full fine-tune's step then added over 7 GB per rank (OOM-killed at 12 GB per
        # rank). About a block each (at least 1e7 elements, so a small model is not cut into crumbs).
        zero["sub_group_size"] = max(block_numel, 10_000_000)
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

"""The optimizers: each one's settings, its own checks and what it is (capabilities the rest of the launcher asks).
How each is built lives in launcher/worker/optim.py. Pure: no torch import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

NO_DECAY = ("bias", "norm", "layernorm", "ln_")
"""Parameter names AdamW gives no weight decay (with every parameter of fewer than 2 dimensions)."""


def decays(name: str, ndim: int) -> bool:
    """Whether the optimizer applies weight decay to parameter `name` of `ndim` dimensions (its first group)."""
    return ndim >= 2 and not any(k in name.lower() for k in NO_DECAY)


@dataclass(kw_only=True)
class OptimizerChoice:
    """What every optimizer answers."""

    name: ClassVar[str]
    eight_bit: ClassVar[bool] = False
    """Block-wise 8-bit states (bitsandbytes): they cannot be stepped where ZeRO or FSDP offloads them."""
    steps_offloaded_states: ClassVar[bool] = False
    """It steps optimizer states that ZeRO-Offload keeps on the CPU (and only those)."""

    def problems(self) -> list[str]:
        """Its own settings' problems, each naming the setting, the value and the fix."""
        return []


@dataclass(kw_only=True)
class AdamW(OptimizerChoice):
    """torch AdamW; the fused kernel where parameters are on CUDA, one tensor at a time otherwise."""

    name: ClassVar[str] = "adamw"


@dataclass(kw_only=True)
class AdamW8bit(OptimizerChoice):
    """bitsandbytes AdamW with block-wise 8-bit optimizer states (about 4x smaller than 32-bit)."""

    name: ClassVar[str] = "adamw8bit"
    eight_bit: ClassVar[bool] = True
    min_8bit_size: int = 4096
    """Parameters with fewer elements keep 32-bit states (bitsandbytes' default; small tensors gain nothing)."""

    def problems(self) -> list[str]:
        if self.min_8bit_size < 0:
            return [f"optimizer.min_8bit_size={self.min_8bit_size}: must be 0 or more"]
        return []


@dataclass(kw_only=True)
class PagedAdamW8bit(AdamW8bit):
    """bitsandbytes AdamW8bit with states in paged (unified) memory that spills to the CPU under pressure."""

    name: ClassVar[str] = "paged_adamw8bit"


@dataclass(kw_only=True)
class CpuAdam(OptimizerChoice):
    """DeepSpeed's vectorized CPU Adam(W): steps the optimizer states that ZeRO-Offload keeps on the CPU."""

    name: ClassVar[str] = "cpu_adam"
    steps_offloaded_states: ClassVar[bool] = True


Optimizer = AdamW | AdamW8bit | PagedAdamW8bit | CpuAdam

OPTIMIZERS: dict[str, object] = {
    "adamw": AdamW,
    "adamw8bit": AdamW8bit,
    "paged_adamw8bit": PagedAdamW8bit,
    "cpu_adam": CpuAdam,
}

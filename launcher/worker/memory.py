"""A rank's host memory: keep glibc from holding freed memory, and read what the process really used.

glibc serves allocations below its mmap threshold from the heap and keeps freed heap blocks for reuse; the threshold
also rises (up to 32 MB) each time a larger block is freed. A rank that loads a model tensor by tensor, or trains
on the CPU, frees many blocks of one to tens of MB, and the heap they leave behind grew a 1B-parameter QLoRA rank
from 1.2 GB to 2.9 GB resident (tests/test_big_models.py measures it). A fixed 1 MB threshold gives such blocks
back to the system the moment they are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20

_libc: ctypes.CDLL | None | bool = None


def _c() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    return _libc or None


LEAN_FROM_PARAMETERS = 250_000_000
"""host_memory=auto keeps a rank lean from this many parameters: the 1B models the heap grew by a GB on, not the
small ones that pay a third of their CPU speed for it (MiniLM ungrouped under ZeRO-2: 24.7 samples/s lean, 34.9
with glibc's defaults, measured 2026-12-03)."""


def lean(setting: str, parameters: int) -> bool:
    """Whether a rank limits its heap and trims it between blocks (host_memory=lean|fast|auto), for a model of
    `parameters` parameters."""
    return setting == "lean" or (setting == "auto" and parameters >= LEAN_FROM_PARAMETERS)


def limit_heap_retention() -> bool:
    """Serve blocks of 1 MB and more by mmap (given back when freed), unless the user set glibc's own variable.
    Returns whether the setting was applied (glibc only)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _c()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_freed_memory() -> None:
    """Give freed heap memory back to the system now (`malloc_trim`)."""
    libc = _c()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def trim_between_blocks(model: torch.nn.Module, block_types: tuple[type, ...]) -> int:
    """Give freed heap memory back as each part of a transformer block (attention, MLP, norms) starts, in forward
    and, under activation checkpointing, in the recomputation that starts each block's backward. A CPU rank's
    activations and gathered or dequantized weights come and go in blocks below the mmap threshold (a 128-token row
    of a 2048-wide model is 512 KB), and the heap they leave grew a 1B model's ZeRO-3 step by 30 MB per block and
    300 MB per backward (malloc_trim took it back, measured). The hooks sit on the block's children: checkpointing
    recomputes a block by calling its forward directly, so the block's own hooks run only once per step. Returns the
    number of modules hooked."""
    parts = [child for m in model.modules() if isinstance(m, block_types) for child in m.children()]
    for part in parts:
        part.register_forward_pre_hook(lambda *_: release_freed_memory())
    return len(parts)


def rss_mib() -> tuple[float, float]:
    """(resident now, peak resident since start) of this process in MiB, from /proc (0, 0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0.0, 0.0
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]

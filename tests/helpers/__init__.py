"""Programs the tests start: ranks under torchrun that run many cases in one process, and recipes with a fault or a
scripted metric."""

from __future__ import annotations

import gc


def imports_frozen() -> None:
    """Import the libraries a case uses, then move every object made so far out of the garbage collector's scans
    (gc.freeze): the millions of objects these imports leave would otherwise be walked by every full collection,
    the explicit one between cases included (a matrix cell took 28.7 s before this, 13.8 s after)."""
    import bitsandbytes  # noqa: F401
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    gc.collect()
    gc.freeze()


def mean_across_ranks(value: float, device) -> float:
    """A figure of every rank, averaged (the workers report the losses of the whole group)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()

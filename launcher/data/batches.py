"""Padding a batch to its longest row, and the eval shard every rank runs the same number of batches of."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """Right-pad the token lists in `keys` to the longest row (dynamic padding)."""
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key in keys:
        if key not in rows[0]:
            continue
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([r[key] + [fill] * (longest - len(r[key])) for r in rows], dtype=torch.long)
    return out


class EvalShard:
    """This rank's slice of the eval set (`rank::world`), padded with -1 so every rank runs the same number
    of batches: sharded strategies (ZeRO-3, FSDP) need every rank in every forward. -1 rows are dropped."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = list(range(rank, size, world))
        self.length = math.ceil(size / world)

    def __iter__(self) -> Iterator[int]:
        yield from self.indices
        yield from [-1] * (self.length - len(self.indices))

    def __len__(self) -> int:
        return self.length

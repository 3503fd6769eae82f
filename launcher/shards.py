"""Writing a model's tensors as they come: safetensors shards of at most `shard_mb`, then the index transformers
reads (model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json). Only one shard is held at a time, so a
model is written with the memory of its largest shard, not of the model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"


def write_shards(
    folder: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    shard_mb: int = 2000,
    say: Callable[[str], None] = lambda _: None,
    stem: str = "model",
) -> dict:
    """Write `tensors` (name, CPU tensor), in order, into `folder` (which exists); returns the index. A shard is
    written as soon as the next tensor would take it past `shard_mb` (a larger tensor gets a shard of its own).
    Files are named STEM-00001-of-0000N.safetensors and STEM.safetensors.index.json."""
    from safetensors.torch import save_file

    limit = shard_mb * 1024 * 1024
    shards: list[list[str]] = []
    pending: dict = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            shards.append(list(pending))
            save_file(pending, os.path.join(folder, f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
            say(f"wrote shard {len(shards)} ({size / 2**20:.0f} MB, {total / 2**30:.2f} GB so far)")
            pending, size = {}, 0

    for name, t in tensors:
        if size and size + t.nbytes > limit:
            flush()
        pending[name] = t
        size += t.nbytes
        total += t.nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        final = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(folder, f"shard-{i}.safetensors"), os.path.join(folder, final))
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, INDEX if stem == "model" else f"{stem}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index

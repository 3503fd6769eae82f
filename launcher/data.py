"""Reading local data files with precise errors, and the samplers and padding every recipe shares."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

from launcher.errors import ConfigError

# extension -> (datasets builder, its options)
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}


def load_table(path: str, setting: str):
    """Load a local file as a `datasets.Dataset`; every failure names `setting`, the path and the fix."""
    if not path:
        raise ConfigError(f"{setting} is empty: set {setting}=PATH to a .jsonl, .json, .csv, .tsv or .parquet file")
    if not os.path.isfile(path):
        raise ConfigError(f"{setting}={path}: no such file; check the path (relative paths start at {os.getcwd()})")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ConfigError(f"{setting}={path}: unsupported file type '{ext}'; use one of {', '.join(FORMATS)}")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"{setting}={path}: the file is empty; give a file with at least one row")
    import datasets

    datasets.disable_progress_bars()
    builder, options = FORMATS[ext]
    try:
        table = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train", **options)
    except Exception as e:  # datasets raises many types for malformed files
        raise ConfigError(f"{setting}={path}: could not be read as {ext} ({type(e).__name__}: {e})") from None
    if len(table) == 0:
        raise ConfigError(f"{setting}={path}: the file has no rows; give a file with at least one row")
    return table


def require_columns(table, path: str, wanted: dict[str, str]) -> None:
    """`wanted` maps a setting (data.text_field) to the column it names; list the columns that do exist."""
    missing = [f"{setting}={column}" for setting, column in wanted.items() if column not in table.column_names]
    if missing:
        raise ConfigError(
            f"{path} has no column for {', '.join(missing)}; its columns are {', '.join(table.column_names)}: "
            f"set the field name to one of them"
        )


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

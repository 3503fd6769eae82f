"""Tokenization through the on-disk cache: `table.map(encode)` plus a length column, done once per node.

The cache key is built here from the whole configuration, so a recipe cannot forget a setting that shapes its
tokenized rows: every data file the run names (content), the tokenizer (state), the settings that may shape the
rows (SHAPE_ROWS, the recipe's own but its `run_only`; not those of the data section that decide how batches are
drawn, NOT_TOKENIZATION), and the recipe file."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from launcher.config import DataConfig

SHAPE_ROWS = ("model", "data")
"""Of the settings every run has (RunConfig's), those that may shape tokenized rows; the rest decide how the run
trains, resumes, reports or is watched. A recipe's own settings shape them unless its Config names them in
`run_only` (qlora_sft: its kernels and attention)."""
# Data settings that change how batches are drawn or where the cache lives, not what tokenization produces.
NOT_TOKENIZATION = ("group_by_length", "cache", "cache_dir")


def data_settings(data: DataConfig) -> dict[str, Any]:
    """The data section as a cache-key part: every setting except those in NOT_TOKENIZATION."""
    from launcher.overrides import to_dict

    return {k: v for k, v in to_dict(data).items() if k not in NOT_TOKENIZATION}


def tokenization_settings(cfg: Any) -> dict[str, Any]:
    """Every setting of a run that may shape its tokenized rows: SHAPE_ROWS, and the recipe's own settings but
    those it names in `run_only`."""
    import dataclasses

    from launcher.config import RunConfig
    from launcher.overrides import to_dict

    common = {f.name for f in dataclasses.fields(RunConfig)}
    run_only = set(type(cfg).run_only)
    out = {k: v for k, v in to_dict(cfg).items() if (k in SHAPE_ROWS or k not in common) and k not in run_only}
    out["data"] = data_settings(cfg.data)
    return out


def recipe_file(cfg: Any) -> str:
    """The recipe module that defines `cfg`'s class (its code shapes the encoding too)."""
    return os.path.abspath(sys.modules[type(cfg).__module__].__file__)


def cache_key(cfg: Any, split: str, rows: int | None, tokenizer: Any) -> dict[str, Any]:
    """What a split's tokenized rows depend on (`rows` and `tokenizer` None for a tokenizer learnt from the data)."""
    from launcher.data import cache as datacache
    from launcher.data.files import source_path

    d = cfg.data
    sources = {s: datacache.file_digest(source_path(getattr(d, s), f"data.{s}")) for s in ("train", "eval")}
    return {
        "split": split,
        "data": {s: digest for s, digest in sources.items() if getattr(d, s)},
        "rows": rows,
        "tokenizer": datacache.tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "settings": tokenization_settings(cfg),
        "code": datacache.file_digest(recipe_file(cfg)),
    }


def tokenize(table, encode: Callable[[dict[str, list]], dict[str, list]], cfg: Any, *, split: str, tokenizer: Any):
    """`table.map(encode, batched=True)` plus a `length` column, done once and cached (see launcher.data.cache):
    `tokenize(table, encode, cfg, split="train", tokenizer=tokenizer)` returns the tokenized table and notes
    whether it was reused for the run log."""
    from launcher.data import cache as datacache
    from launcher.data.notes import note

    def build():
        return _map(table, encode), []

    if not cfg.data.cache:
        return build()[0]
    key = cache_key(cfg, split, len(table), tokenizer)
    folder = cfg.data.cache_dir or datacache.default_dir()
    entry = datacache.cached(key, build, folder, wait_message=f"tokenizing {split}")
    note(f"{split}: {'reused' if entry.reused else 'tokenized and cached'} {len(entry.table):,} rows ({entry.path})")
    return entry.table


def _map(table, encode):
    def with_length(rows):
        out = encode(rows)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    return table.map(with_length, batched=True, remove_columns=table.column_names)

"""Tokenization through the on-disk cache: `table.map(encode)` plus a length column, done once per node.

The cache key is built here from the whole configuration, so a recipe cannot forget a setting that shapes its
tokenized rows: every data file the run names (content), the tokenizer (state), the settings that may shape the
rows (their tags in launcher.settings), and the recipe file."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def tokenization_settings(cfg: Any) -> dict[str, Any]:
    """Every setting of a run that may shape its tokenized rows (launcher.settings: the model, the data section but
    how batches are drawn and where the cache lives, and the recipe's own settings it does not tag otherwise)."""
    from launcher.overrides import to_dict
    from launcher.settings import rows_settings

    return rows_settings(to_dict(cfg), type(cfg))


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

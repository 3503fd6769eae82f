"""Tokenization through the on-disk cache: `table.map(encode)` plus a length column, done once per node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from launcher.config import DataConfig

# Data settings that change how batches are drawn or where the cache lives, not what tokenization produces.
NOT_TOKENIZATION = ("group_by_length", "cache", "cache_dir")


def data_settings(data: DataConfig) -> dict[str, Any]:
    """The data section as a cache-key part: every setting except those in NOT_TOKENIZATION."""
    from launcher.overrides import to_dict

    return {k: v for k, v in to_dict(data).items() if k not in NOT_TOKENIZATION}


def tokenize(
    table,
    encode: Callable[[dict[str, list]], dict[str, list]],
    *,
    data: DataConfig,
    source: str,
    split: str,
    tokenizer: Any,
    settings: dict[str, Any],
    code: str,
    notes: list[str] | None = None,
):
    """`table.map(encode, batched=True)` plus a `length` column, done once and cached (see launcher.data.cache).

    The cache key is the content of `source` (the file or folder the rows came from), the tokenizer, `settings`
    (everything the recipe's encoding depends on: fields, max length, label names...) and the recipe file `code`.
    Returns (tokenized table, notes for the run log)."""
    from launcher.data import cache as datacache

    def with_length(rows):
        out = encode(rows)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    def build():
        return table.map(with_length, batched=True, remove_columns=table.column_names), list(notes or [])

    if not data.cache:
        return build()
    key = {
        "split": split,
        "data": datacache.file_digest(source),
        "rows": len(table),
        "tokenizer": datacache.tokenizer_digest(tokenizer),
        "settings": settings,
        "code": datacache.file_digest(code),
    }
    entry = datacache.cached(key, build, data.cache_dir or datacache.default_dir(), wait_message=f"tokenizing {split}")
    how = "reused" if entry.reused else "tokenized and cached"
    return entry.table, [*entry.notes, f"{split}: {how} {len(entry.table):,} rows ({entry.path})"]

"""The tokens of a recipe's training split, before launch (for `launcher plan`'s time per epoch): counted from the
tokenized cache a run left (launcher.data.tokenize), else estimated from a sample of the raw file. Builds no model,
imports no datasets (about 2 s), never raises over the data."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from launcher.config import RunConfig
from launcher.errors import ConfigError

CHARS_PER_TOKEN = 4
"""ASCII characters per token for a BPE or WordPiece vocabulary on English text (about 4.1 measured on the SST-2
sample with MiniLM's tokenizer); other characters (CJK above all) count one token each."""

SAMPLE_ROWS = 200
"""Rows of the raw training file read to estimate its tokens when no tokenized cache is found."""


@dataclass(frozen=True, kw_only=True)
class DatasetTokens:
    """The tokens of a recipe's training split, and how they were found."""

    tokens: int
    """Tokens of every training example after truncation to data.max_length; padding not included (0: unknown)."""
    examples: int
    """Training examples they come from (before SFT packing; 0: unknown)."""
    source: Literal["cache", "sample", "unknown"]
    """cache: counted from the tokenized table a run left; sample: estimated from the first SAMPLE_ROWS rows of the
    raw file; unknown: see note."""
    note: str
    """Where the figure comes from, or why there is none."""


def dataset_tokens(cfg: RunConfig) -> DatasetTokens:
    """The training split's tokens: counted from the tokenized cache when a run with the same data, settings and
    recipe code built it, else estimated from a sample of the raw file. Never raises over the data: a missing or
    unreadable file is `unknown`, with the reason."""
    from launcher.data.files import source_path

    data = getattr(cfg, "data", None)
    path = getattr(data, "train", "") if data is not None else ""
    if not path:
        return _unknown("the recipe sets no data.train")
    try:
        source = source_path(path, "data.train")
    except ConfigError as e:
        return _unknown(str(e))
    if not os.path.exists(source):
        return _unknown(f"data.train={path}: no such file or folder")
    try:
        return _from_cache(cfg, source) or _from_sample(cfg, source)
    except Exception as e:  # any malformed file or cache entry: the plan says why it has no time, and goes on
        return _unknown(f"data.train={path}: could not be read ({type(e).__name__}: {e})")


def _unknown(why: str) -> DatasetTokens:
    return DatasetTokens(tokens=0, examples=0, source="unknown", note=why)


def _from_cache(cfg: RunConfig, source: str) -> DatasetTokens | None:
    """The newest cache entry (launcher.data.tokenize.cache_key) of the training split whose data, settings and
    recipe code are this run's. The tokenizer is not compared: its digest needs the tokenizer loaded, and the
    settings already hold the model (and a recipe's tokenizer setting)."""
    from launcher.data import cache as datacache
    from launcher.data.files import source_path
    from launcher.data.tokenize import recipe_file, tokenization_settings

    d = cfg.data
    folder = d.cache_dir or datacache.default_dir()
    if not d.cache or not os.path.isdir(folder):
        return None
    # The stored key went through json.dump(default=str): compare like with like.
    settings = json.loads(json.dumps(tokenization_settings(cfg), default=str))
    entries = []
    for name in os.listdir(folder):
        try:
            with open(os.path.join(folder, name, "key.json")) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            continue  # a lock file, a half-written entry, a tokenizer's entry of another layout
        key = stored.get("key", {}) if isinstance(stored, dict) else {}
        if key.get("split") == "train" and key.get("settings") == settings:
            entries.append((stored.get("created", 0), name, key))
    if not entries:
        return None  # before hashing the data files, which costs a read of each
    try:
        code = datacache.file_digest(recipe_file(cfg))
    except (KeyError, AttributeError, TypeError):
        return None  # cfg's class is not from a loaded recipe file: no run can have cached it
    digests = {s: datacache.file_digest(source_path(getattr(d, s), f"data.{s}")) for s in ("train", "eval")}
    digests = {s: v for s, v in digests.items() if getattr(d, s)}
    matches = sorted(e for e in entries if e[2].get("code") == code and e[2].get("data") == digests)
    if not matches:
        return None
    _, name, _ = matches[-1]
    tokens, examples = _cached_lengths(os.path.join(folder, name, "data"))
    more = f", the newest of {len(matches)} entries for other tokenizers" if len(matches) > 1 else ""
    where = os.path.join(folder, name)
    return DatasetTokens(
        tokens=tokens,
        examples=examples,
        source="cache",
        note=f"counted from the tokenized cache ({examples:,} examples in {where}{more})",
    )


def _cached_lengths(folder: str) -> tuple[int, int]:
    """(sum of the length column, rows) of a table written by datasets' save_to_disk, read with pyarrow (memory-mapped:
    importing datasets alone takes about 2 s)."""
    import pyarrow.compute as pc

    table = _arrow_table(folder)
    if "length" in table.column_names:
        lengths = table.column("length")
    else:  # a table tokenized without launcher.data.tokenize's length column
        lengths = pc.list_value_length(table.column("input_ids"))
    return int(pc.sum(lengths).as_py() or 0), table.num_rows


def _arrow_table(folder: str, limit: int = 0):
    """The Arrow table of a save_to_disk folder (one split), memory-mapped; with `limit`, its first rows only."""
    import pyarrow as pa

    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        with open(os.path.join(folder, "dataset_dict.json")) as f:
            splits = json.load(f)["splits"]
        if len(splits) != 1:
            raise ValueError(f"a DatasetDict with splits {', '.join(splits)}; point data.train at one split's folder")
        folder = os.path.join(folder, splits[0])
    with open(os.path.join(folder, "state.json")) as f:
        files = [os.path.join(folder, entry["filename"]) for entry in json.load(f)["_data_files"]]
    batches = []
    for name in files:
        for batch in pa.ipc.open_stream(pa.memory_map(name)):
            batches.append(batch)
            if limit and sum(b.num_rows for b in batches) >= limit:
                return pa.Table.from_batches(batches).slice(0, limit)
    if not batches:
        raise ValueError(f"{folder} holds no rows")
    return pa.Table.from_batches(batches)


def _from_sample(cfg: RunConfig, source: str) -> DatasetTokens:
    """Tokens of the first SAMPLE_ROWS rows (the recipe's text columns, truncated to data.max_length) scaled by the
    row count (capped at data.max_train_rows)."""
    rows, total = _raw_sample(source, SAMPLE_ROWS)
    if not rows:
        return _unknown(f"data.train={cfg.data.train}: no rows")
    if cfg.data.max_train_rows:
        total = min(total, cfg.data.max_train_rows)
    columns = _text_columns(cfg.data, rows[0])
    texts = [" ".join(_text(row.get(c)) for c in columns) for row in rows]
    count, how = _token_counter(cfg)
    limit = getattr(cfg.data, "max_length", 0) or 0
    per_row = [min(n, limit) if limit else n for n in count(texts)]
    tokens = round(sum(per_row) / len(per_row) * total)
    return DatasetTokens(
        tokens=tokens,
        examples=total,
        source="sample",
        note=f"estimated from the first {len(rows):,} of {total:,} rows ({how}; columns {', '.join(columns)})",
    )


def _raw_sample(path: str, n: int) -> tuple[list[dict], int]:
    """The first `n` rows of a data file or save_to_disk folder, and its row count, without datasets' conversion
    to Arrow (which would read and copy the whole file)."""
    if os.path.isdir(path):
        return _arrow_table(path, n).to_pylist(), _arrow_table(path).num_rows
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return _json_sample(path, n)
    if ext in (".csv", ".tsv"):
        with open(path, newline="") as f:
            rows, total = [], 0
            for row in csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","):
                total += 1
                if len(rows) < n:
                    rows.append(row)
        return rows, total
    if ext == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        first = next(pf.iter_batches(batch_size=n), None)
        return (first.to_pylist() if first is not None else []), pf.metadata.num_rows
    raise ValueError(f"unsupported file type '{ext}'")


def _json_sample(path: str, n: int) -> tuple[list[dict], int]:
    """A JSON array, or JSON Lines (datasets reads both from .json and .jsonl); blank lines are not rows."""
    with open(path, "rb") as f:
        array = f.read(4096).lstrip().startswith(b"[")
    if array:
        with open(path) as f:
            rows = json.load(f)
        return rows[:n], len(rows)
    rows, total = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                total += 1
                if len(rows) < n:
                    rows.append(json.loads(line))
    return rows, total


def _text_columns(data: Any, row: dict) -> list[str]:
    """The columns the recipe tokenizes: those its data.*_field settings name, less labels and tags; when it names
    none that exist, every column but those."""
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name.endswith("_field")}
    answers = {c for name, c in fields.items() if "label" in name or "tag" in name}
    named = [c for c in fields.values() if isinstance(c, str) and c in row and c not in answers]
    return named or [c for c in row if c not in answers]


def _text(value: Any) -> str:
    """The text of a field: a string, a list of words, or chat turns ({role, content}: the content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return _text(value["content"]) if "content" in value else " ".join(_text(v) for v in value.values())
    return ""


def _token_counter(cfg: RunConfig) -> tuple[Callable[[list[str]], list[int]], str]:
    """Counts tokens of texts with the run's tokenizer when it is a local tokenizer.json (the `tokenizers` library
    loads one in milliseconds, special tokens included), else by characters (CHARS_PER_TOKEN)."""
    setting = getattr(cfg, "tokenizer", "auto")
    if setting == "chars":  # lora_ner's character vocabulary: a token per character, plus [CLS] and [SEP]
        return (lambda texts: [len(t.replace(" ", "")) + 2 for t in texts]), "a token per character"
    folder = _tokenizer_folder(cfg, setting)
    if folder and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        tok.no_truncation()  # a saved tokenizer may carry its own; data.max_length is applied after
        tok.no_padding()
        return (lambda texts: [len(e.ids) for e in tok.encode_batch(texts)]), "tokenized with the model's tokenizer"

    def by_characters(texts: list[str]) -> list[int]:
        out = []
        for t in texts:
            ascii_chars = sum(c.isascii() for c in t)
            out.append(math.ceil(ascii_chars / CHARS_PER_TOKEN) + len(t) - ascii_chars)
        return out

    return by_characters, f"about {CHARS_PER_TOKEN} characters per token, no tokenizer read"


def _tokenizer_folder(cfg: RunConfig, setting: str) -> str:
    """The folder of the run's tokenizer: a recipe's tokenizer setting, else the model's folder ('' for a random
    model, whose tokenizer is learnt from the data, or a model not on disk)."""
    from launcher.models import is_random, resolve_model

    if setting not in ("auto", "train", "chars"):
        return setting if os.path.isdir(setting) else ""
    if setting == "train" or not cfg.model or is_random(cfg.model):
        return ""
    try:
        path = resolve_model(cfg.model)
    except ConfigError:
        return ""
    return path if os.path.isdir(path) else ""

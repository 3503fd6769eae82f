"""Reading local data files and checking their rows, with errors that name the setting, the row and the fix."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
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


SAMPLE = "sample:"
"""`data.train=sample:NAME` names a sample shipped in launcher/samples/NAME (train.jsonl, and test.jsonl for eval)."""
SAMPLE_FILES = {"data.train": "train.jsonl", "data.eval": "test.jsonl"}


def source_path(path: str, setting: str) -> str:
    """The file or folder `setting=path` reads: a packaged sample's file for `sample:NAME`, else `path` itself."""
    if not path.startswith(SAMPLE):
        return path
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")
    name = path[len(SAMPLE) :]
    known = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
    if name not in known or setting not in SAMPLE_FILES:
        raise ConfigError(f"{setting}={path}: no such packaged sample; samples: {', '.join(SAMPLE + n for n in known)}")
    return os.path.join(folder, name, SAMPLE_FILES[setting])


_SCRATCH: list[str] = []  # while non-empty: where `datasets` may write its cache (a dry run writes nothing lasting)


@contextlib.contextmanager
def scratch_cache():
    """Let `datasets` keep what it converts (its Arrow cache) in a temporary folder, deleted on exit: a dry run
    reads and checks the data but leaves nothing behind."""
    folder = tempfile.mkdtemp(prefix="launcher-dry-run-")
    _SCRATCH.append(folder)
    try:
        yield folder
    finally:
        _SCRATCH.remove(folder)
        shutil.rmtree(folder, ignore_errors=True)


def scratch_active() -> bool:
    """Whether a dry run's scratch cache is open (nothing of this process's reading is to be kept)."""
    return bool(_SCRATCH)


def load_table(path: str, setting: str):
    """Load a local file, a folder written by `datasets.save_to_disk` or a packaged `sample:NAME`, as a
    `datasets.Dataset`; every failure names `setting`, the path and the fix."""
    path = source_path(path, setting)
    if not path:
        raise ConfigError(
            f"{setting} is empty: set {setting}=PATH to a .jsonl, .json, .csv, .tsv or .parquet file "
            f"or a folder saved with datasets' save_to_disk"
        )
    if os.path.isdir(path):
        return _load_saved(path, setting)
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
        cache = {"cache_dir": _SCRATCH[-1]} if _SCRATCH else {}
        with _quiet("datasets"):  # its own log line of a bad file says less than the error below
            table = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train", **options, **cache)
    except Exception as e:  # datasets raises many types for malformed files
        bad = _bad_json_line(path) if ext == ".jsonl" else None
        if bad:
            raise ConfigError(f"{setting}={path}: {bad}; fix or remove that line") from None
        raise ConfigError(f"{setting}={path}: could not be read as {ext} ({type(e).__name__}: {e})") from None
    if len(table) == 0:
        raise ConfigError(f"{setting}={path}: the file has no rows; give a file with at least one row")
    return table


@contextlib.contextmanager
def _quiet(name: str):
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _bad_json_line(path: str) -> str:
    """The first line of a JSONL file that is not a JSON object, said with its number (counted from 1)."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                return f"line {number} is not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
            if not isinstance(row, dict):
                return f"line {number} holds {_show(row)}, not a JSON object of fields"
    return ""


def _raw_values(path: str, column: str, rows: int) -> list[Any] | None:
    """The first `rows` values of `column` as a JSONL file holds them, before Arrow gives the column one type (an
    integer column with one 1.5 in it is read as floats throughout); None for other files."""
    import json

    if os.path.splitext(path)[1].lower() != ".jsonl":
        return None
    values = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                values.append(json.loads(line).get(column))
                if len(values) == rows:
                    break
    return values


def _load_saved(path: str, setting: str):
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_from_disk(path)
    except Exception as e:
        raise ConfigError(
            f"{setting}={path}: a folder, but not one written by datasets' save_to_disk ({type(e).__name__}: {e}); "
            f"give a data file or such a folder"
        ) from None
    if isinstance(table, datasets.DatasetDict):
        splits = list(table)
        if len(splits) != 1:
            raise ConfigError(
                f"{setting}={path}: a DatasetDict with splits {', '.join(splits)}; "
                f"point at one split's folder, e.g. {setting}={os.path.join(path, splits[0])}"
            )
        table = table[splits[0]]
    if len(table) == 0:
        raise ConfigError(f"{setting}={path}: the dataset has no rows; give one with at least one row")
    return table


def require_columns(table, path: str, wanted: dict[str, str]) -> None:
    """`wanted` maps a setting (data.text_field) to the column it names; list the columns that do exist."""
    missing = [f"{setting}={column}" for setting, column in wanted.items() if column not in table.column_names]
    if missing:
        raise ConfigError(
            f"{path} has no column for {', '.join(missing)}; its columns are {', '.join(table.column_names)}: "
            f"set the field name to one of them"
        )


# What a mapped field must hold: kind -> (test, what to tell the user).
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "label": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "an integer or a string"),
    "words": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "messages": (
        lambda v: (
            isinstance(v, list)
            and all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in v
            )
        ),
        "a list of {role, content} turns",
    ),
}


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def check_rows(
    table, path: str, setting: str, fields: dict[str, tuple[str, str]], limit: int = 0
) -> tuple[Any, list[str]]:
    """Check the rows' mapped fields. `fields` maps a setting (data.text_field) to (column, kind in KINDS).

    Missing columns are an error listing the columns that exist (`require_columns`). A value of the wrong type
    is an error naming the row, the setting and what the row holds. Rows with an
    empty field (missing, "", []) are dropped and counted in the returned notes: one bad line in a million
    should not stop a run, but the user must hear about it. Rows are numbered from 1 (= line of a JSONL file).
    With `limit`, only the rows needed for the first `limit` valid ones are read and checked (a cut of a large
    file costs what the cut costs); the table returned holds at most `limit` rows."""
    require_columns(table, path, {name: column for name, (column, _) in fields.items()})
    empty: set[int] = set()
    wrong: list[str] = []
    read, step = 0, max(1024, 2 * limit)
    while read < len(table) and (not limit or read - len(empty) < limit):
        end = min(len(table), read + step)
        part = table.select(range(read, end)) if (read, end) != (0, len(table)) else table
        for name, (column, kind) in fields.items():
            test, want = KINDS[kind]
            for i, value in enumerate(part[column], start=read):
                if is_empty(value):
                    empty.add(i)
                elif not test(value):
                    wrong.append(f"row {i + 1}: {name}={column} holds {_show(value)}, expected {want}")
        read = end
    if wrong:
        wrong = _as_written(table, path, setting, fields, read) or wrong
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise ConfigError(
            [f"{setting}={path} {w}" for w in wrong[:5]]
            + [f"{setting}={path}: {len(wrong)} value(s) of the wrong type{more}; fix those rows or map another field"]
        )
    notes = []
    names = ", ".join(f"{n}={c}" for n, (c, _) in fields.items())
    if len(empty) == read:
        raise ConfigError(f"{setting}={path}: every one of its {read} rows has an empty {names}")
    keep = [i for i in range(read) if i not in empty][: limit or None]
    if empty:
        rows = sorted(empty)
        shown = ", ".join(str(i + 1) for i in rows[:10]) + (", ..." if len(rows) > 10 else "")
        of = f"{len(table)}" if read == len(table) else f"the first {read} (of {len(table)})"
        notes.append(f"{setting}={path}: skipped {len(rows)} of {of} rows with an empty {names} (rows {shown})")
    if len(keep) < len(table):
        table = table.select(keep)
    return table, notes


def _as_written(table, path: str, setting: str, fields: dict[str, tuple[str, str]], read: int) -> list[str]:
    """The wrong values again, from the file as written where Arrow changed a column's type (a file's integers
    read as floats because one value is): the row at fault, not the first rows of the column."""
    source = source_path(path, setting)
    out = []
    for name, (column, kind) in fields.items():
        dtype = getattr(table.features.get(column), "dtype", "")
        if kind != "label" or not str(dtype).startswith("float"):
            continue
        values = _raw_values(source, column, read)
        if values is None:
            return []
        test, want = KINDS[kind]
        out += [
            f"row {i}: {name}={column} holds {_show(v)}, expected {want}"
            for i, v in enumerate(values, start=1)
            if not is_empty(v) and not test(v)
        ]
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}... ({type(value).__name__})" if len(text) > 40 else f"{text} ({type(value).__name__})"


def first_rows(table, n: int):
    """The first `n` rows of a table (`data.max_train_rows` / `data.max_eval_rows`); all of them when n is 0."""
    return table.select(range(min(n, len(table)))) if n else table


# What a split's fields must hold: setting -> (column, kind in KINDS); or a function of the loaded table giving that
# (when the columns decide the format, as qlora_sft's alpaca-or-chat).
Fields = dict[str, tuple[str, str]] | Callable[[Any], dict[str, tuple[str, str]]]

_READ: dict[str, tuple[tuple, Any, list[str]]] = {}  # split -> (what was read, table, notes): the last read only


def forget_reads() -> None:
    """Forget the splits read so far (a new plan's checks read their own)."""
    _READ.clear()


def rows_read(split: str) -> int | None:
    """The checked rows of `split` read since `forget_reads` (None: none was read: a recipe of its own reading)."""
    entry = _READ.get(split)
    return len(entry[1]) if entry is not None else None


def read_split(data: Any, split: str, fields: Fields):
    """The checked rows of one split (`split` is "train" or "eval"): `data.train` / `data.eval` loaded, the rows'
    fields checked (`check_rows`: wrong types stop the run, empty rows are skipped and noted) up to the first
    `data.max_train_rows` / `data.max_eval_rows` valid rows, which are all that is kept. Remembered for this
    process, so a recipe's `check` and its `build_task` read a file once."""
    from launcher.data.notes import note

    path = getattr(data, split)
    setting = f"data.{split}"
    limit = data.max_train_rows if split == "train" else data.max_eval_rows
    source = source_path(path, setting)
    stat = os.stat(source) if os.path.exists(source) else None
    key = (
        split,
        os.path.abspath(source),
        stat and (stat.st_mtime_ns, stat.st_size),
        limit,
        repr(fields) if not callable(fields) else (fields.__qualname__, repr(sorted(vars(data).items()))),
    )
    if _READ.get(split, (None,))[0] != key:
        table = load_table(path, setting)
        wanted = fields(table) if callable(fields) else fields
        table, notes = check_rows(table, path, setting, wanted, limit)
        _READ[split] = (key, table, notes)
    _, table, notes = _READ[split]
    for line in notes:
        note(line)
    return table

"""Tokenized data cached on disk, keyed by a fingerprint of the data, the tokenizer and the settings.

The first process of a node to take the lock builds the table; the others wait on the file lock, not on a
collective (a large dataset can take longer to tokenize than any process-group timeout), then read it. The
next run with the same data, tokenizer, settings and recipe code reads it without tokenizing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from typing import Any

# Bumped when the cached layout changes, so old entries are never read by new code.
LAYOUT = 1


def default_dir() -> str:
    return os.path.join(os.environ.get("LAUNCHER_CACHE") or os.path.expanduser("~/.cache/launcher"), "tokenized")


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """Content hash of a data file, or of every file in a saved-dataset folder (names included). A file's hash is
    remembered for this process while its size and modification time stay the same."""
    if os.path.isfile(path):
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = _digest(path)
        return _DIGESTS[key]
    return _digest(path)


def _digest(path: str) -> str:
    h = hashlib.sha256()
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    )
    for name in files:
        h.update(os.path.relpath(name, path).encode() if name != path else b"")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """What decides how a tokenizer splits and numbers text: its full serialized state and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # A call with truncation=True/padding leaves those settings on the backend: not part of its identity.
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def fingerprint(key: dict[str, Any]) -> str:
    text = json.dumps({"layout": LAYOUT, **key}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class Cached:
    table: Any
    """The tokenized `datasets.Dataset` (memory-mapped from the cache)."""
    reused: bool
    """True when it was read from an earlier build, False when this process built it."""
    notes: list[str] = field(default_factory=list)
    """What the build reported (e.g. skipped rows), kept with the cache so a reuse reports it too."""
    path: str = ""


def _save_table(table: Any, folder: str) -> None:
    table.save_to_disk(folder)


def _load_table(folder: str) -> Any:
    import datasets

    return datasets.load_from_disk(folder)


def cached(
    key: dict[str, Any],
    build: Callable[[], tuple[Any, list[str]]],
    cache_dir: str,
    *,
    save: Callable[[Any, str], None] = _save_table,
    load: Callable[[str], Any] = _load_table,
    wait_message: str = "tokenized data",
    poll_seconds: float = 0.5,
    say_every: float = 60.0,
) -> Cached:
    """The object stored under `key`'s fingerprint in `cache_dir`, built by `build()` -> (object, notes) if absent.
    `save(object, folder)` / `load(folder)` store it (default: a `datasets.Dataset`; a tokenizer works too).

    Written to a temporary folder and renamed, so a crash never leaves half an entry; `key` is stored beside it
    so a cache folder can be inspected."""
    import datasets

    datasets.disable_progress_bars()
    digest = fingerprint(key)
    final = os.path.join(cache_dir, digest)
    if _complete(final):
        return _read(final, load, reused=True)
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f".{digest}.lock"), "w") as lock:
        _take(lock, poll_seconds, say_every, wait_message)
        try:
            if _complete(final):  # another process built it while this one waited
                return _read(final, load, reused=True)
            table, notes = build()
            if isinstance(table, Sized) and len(table) == 0:  # nothing to keep (and datasets cannot reload it)
                return Cached(table=table, reused=False, notes=notes, path="(not cached: no rows)")
            tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".{digest}-")
            try:
                save(table, os.path.join(tmp, "data"))
                with open(os.path.join(tmp, "key.json"), "w") as f:
                    json.dump({"key": key, "notes": notes, "created": time.time()}, f, indent=2, default=str)
                _publish(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _read(final, load, reused=False)


def _take(lock, poll_seconds: float, say_every: float, what: str) -> None:
    """Wait for the lock without a deadline, saying so now and then (a blocked flock would say nothing)."""
    started = last = time.monotonic()
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if now - last >= say_every:
                print(f"waiting {now - started:.0f}s for another process to finish {what}", file=sys.stderr)
                last = now
            time.sleep(poll_seconds)


def _publish(tmp: str, final: str) -> None:
    try:
        os.replace(tmp, final)
    except OSError:
        # On a shared file system a process on another node may have published the same entry first.
        if not _complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "key.json"))


def _read(path: str, load: Callable[[str], Any], reused: bool) -> Cached:
    with open(os.path.join(path, "key.json")) as f:
        notes = json.load(f).get("notes", [])
    return Cached(table=load(os.path.join(path, "data")), reused=reused, notes=notes, path=path)

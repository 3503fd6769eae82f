"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import tempfile


def output_dir_problems(path: str) -> list[str]:
    """Why `output_dir=path` cannot hold a run: it is a file, lies under a file, or its nearest existing folder
    cannot be written (a probe folder is made and removed there: permission bits do not tell for root or for
    read-only file systems)."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        return [f"output_dir={path}: this is a file, not a folder; give a folder for the run, e.g. output_dir=runs/x"]
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [f"output_dir={path}: {existing} is a file, so no folder can be made under it; give another path"]
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".launcher-probe-"))
    except OSError as e:
        return [f"output_dir={path}: cannot write in {existing} ({e.strerror}); give a folder you can write"]
    return []


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ordinary_modes(folder: str) -> None:
    """Give every file under `folder` the mode the user's umask gives a new file (and folders theirs): safetensors
    writes its files 0600, which a teammate sharing the run folder could not read, unlike every other file of it."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)

"""What `launcher check` asks of each host, run there over ssh as `python -m launcher.launch.probe OUTPUT_DIR`: one
JSON line (PROBE_MARK + JSON) with the versions of what a run imports (read from the installed packages' metadata,
nothing imported but torch, for its devices), the accelerators, and the free space and write access where the run
writes (OUTPUT_DIR, or the nearest folder above it that exists)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata

PROBE_MARK = "@launcher-probe "
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes")


def probe(output_dir: str) -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    import torch

    folder = os.path.abspath(output_dir)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".launcher-check-"):
            writable = True
    except OSError:
        writable = False
    return {
        "versions": versions,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "folder": folder,
        "free_bytes": shutil.disk_usage(folder).free,
        "writable": writable,
    }


if __name__ == "__main__":
    print(PROBE_MARK + json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else ".")), flush=True)

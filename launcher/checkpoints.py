"""Checkpoint decisions, pure: where checkpoints live, which are complete, which to keep, which settings a resume
may change. The worker's checkpoint module writes and reads them.

A checkpoint is a folder `output_dir/checkpoints/step-00000012`, written as `step-00000012.tmp` and renamed once
every file and the manifest (written last) are on disk: a folder with a manifest and no `.tmp` is complete.
"""

from __future__ import annotations

import os
import re
from typing import Any

FOLDER = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 1
"""The manifest's format number: a checkpoint of another format is refused, never half-read."""
_NAME = re.compile(r"^step-(\d{8})$")

# Settings a resumed run may change: they do not change what is computed (where and how often it is reported,
# when checkpoints are written). Everything else must equal the checkpoint's configuration.
MAY_CHANGE = (
    "output_dir",
    "overwrite",
    "resume",
    "checkpoint.",
    "train.eval_every",
    "train.eval_at_start",
    "train.log_every",
    "data.eval",
    "data.max_eval_rows",
    "data.cache",
    "data.cache_dir",
)


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def root(output_dir: str) -> str:
    return os.path.join(output_dir, FOLDER)


def complete(output_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of the complete checkpoints of a run directory, oldest first."""
    where = root(output_dir)
    if not os.path.isdir(where):
        return []
    found = []
    for name in os.listdir(where):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(where, name, MANIFEST)):
            found.append((int(m.group(1)), os.path.join(where, name)))
    return sorted(found)


def to_delete(steps: list[int], keep: int) -> list[int]:
    """The checkpoints to delete once a new one is complete: all but the newest `keep`."""
    return sorted(steps)[: max(0, len(steps) - max(1, keep))]


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A configuration dict (overrides.to_dict) as dotted paths: {"train.lr": 0.001, "strategy.name": "zero3"}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, path + "."))
        else:
            out[path] = value
    return out


def math_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a configuration that change what a run computes (all but MAY_CHANGE)."""
    return {
        k: v
        for k, v in flat(config).items()
        if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_CHANGE)
    }


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each setting that changes the math and differs between a checkpoint's configuration and this run's."""
    a, b = math_settings(saved), math_settings(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(
                f"{key}: the checkpoint has {_shown(a.get(key, '<unset>'))}, this run {_shown(b.get(key, '<unset>'))}"
            )
    return out


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)

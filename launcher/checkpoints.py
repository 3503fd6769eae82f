"""Checkpoint decisions, pure: where checkpoints live, which are complete, which to keep, which settings a resume
may change. The worker's checkpoint module writes and reads them.

A checkpoint is a folder `output_dir/checkpoints/step-00000012`, written as `step-00000012.tmp` and renamed once
every file and the manifest (written last) are on disk: a folder with a manifest and no `.tmp` is complete.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from launcher.settings import training_settings

FOLDER = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 1
"""The manifest's format number: a checkpoint of another format is refused, never half-read."""
_NAME = re.compile(r"^step-(\d{8})$")


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


def resume_manifest(resume: str, output_dir: str) -> dict[str, Any] | None:
    """The manifest of the checkpoint `resume=` names (auto: the newest complete one in `output_dir`), or None when
    there is none or it cannot be read (the worker then says why)."""
    if not resume:
        return None
    if resume == "auto":
        found = complete(output_dir)
        if not found:
            return None
        resume = found[-1][1]
    try:
        with open(os.path.join(resume, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def to_delete(steps: list[int], keep: int, protect: int | None = None) -> list[int]:
    """The checkpoints to delete once a new one is complete: all but the newest `keep`, and never `protect` (the
    best evaluated one, checkpoint.keep_best)."""
    return [s for s in sorted(steps)[: max(0, len(steps) - max(1, keep))] if s != protect]


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


# Compared as part of the global batch instead: a job of another size keeps the batch by accumulating more or less.
_BY_GLOBAL_BATCH = ("train.grad_accum",)


def global_batch(config: dict[str, Any], world_size: int) -> int:
    """Examples per optimizer step: micro-batch x accumulation x processes."""
    train = config["train"]
    return train["micro_batch_size"] * train["grad_accum"] * world_size


def accumulation_for(saved: dict[str, Any], saved_world: int, micro_batch_size: int, world_size: int) -> int:
    """The accumulation that keeps a checkpoint's global batch on `world_size` processes. Raises ValueError with
    the arithmetic when none does."""
    batch = global_batch(saved, saved_world)
    per_micro_step = micro_batch_size * world_size
    if batch % per_micro_step:
        fits = [w for w in range(1, batch // micro_batch_size + 1) if batch % (micro_batch_size * w) == 0]
        raise ValueError(
            f"its global batch is {saved['train']['micro_batch_size']} x {saved['train']['grad_accum']} accumulation x "
            f"{saved_world} processes = {batch} examples per step, which {world_size} processes of "
            f"{micro_batch_size} cannot make ({batch} is not a multiple of {per_micro_step}); rerun with --nproc "
            + " or ".join(str(w) for w in fits)
        )
    return batch // per_micro_step


def resumed_batches_done(batches_done: int, saved_accum: int, accum: int) -> int:
    """A rank's micro-batches done in the epoch, counted for this job's accumulation (the steps done are the same)."""
    return batches_done // saved_accum * accum


def differences(saved: dict[str, Any], now: dict[str, Any], config_class: type) -> list[str]:
    """Each setting that changes what training computes (launcher.settings) and differs between a checkpoint's
    configuration and this run's, a `config_class` (the recipe's Config); the accumulation is checked as part of the
    global batch. Where and how often a run reports, saves and is watched may change."""
    a, b = training_settings(flat(saved), config_class), training_settings(flat(now), config_class)
    for key in _BY_GLOBAL_BATCH:
        a.pop(key, None)
        b.pop(key, None)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(
                f"{key}: the checkpoint has {_shown(a.get(key, '<unset>'))}, this run {_shown(b.get(key, '<unset>'))}"
            )
    return out


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def unmatched_parameters(names: list[str], keys: set[str]) -> str | None:
    """How a checkpoint's stored tensors (`keys`: "param/NAME", "optim/NAME/KEY") miss the trained parameters
    `names` of a model, or None when each trained parameter is stored and nothing else is."""
    stored = {k.split("/", 1)[1] for k in keys if k.startswith("param/")}
    if stored == set(names):
        return None
    missing, extra = sorted(set(names) - stored), sorted(stored - set(names))
    return f"missing {missing[:5]}, unexpected {extra[:5]}"

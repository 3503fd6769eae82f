"""Claiming a run directory: one run per directory, decided atomically, held for the whole run.

The claimer (the launcher, or rank 0 of a direct form) takes an exclusive lock on `output_dir/.lock` and keeps it
until it exits, then writes the plan. A directory whose lock is held has a run in progress: refused. One that holds
a plan from an earlier run: refused unless `overwrite=true`, which deletes that run's files first (and only
those). Anything else a run would write over is refused, overwrite or not: a config.json that is not a launcher
plan, files named like a run's outputs with no plan beside them, a symbolic link where a run writes. A default run
directory (the user named none) is never refused: the next free name (`-2`, `-3`, ...) is taken instead, so jobs
of a sweep started in the same second each get their own."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import sys
import time
from typing import IO

from launcher.errors import ConfigError
from launcher.files import write_atomic
from launcher.plan import PLAN_FILE, Plan

LOCK = ".lock"
CLAIMED = "LAUNCHER_CLAIMED"
"""Set by `launcher run` for its ranks: the run directory it claimed for them (so they do not claim it again)."""
# What a run writes into its directory: what overwrite=true deletes (nothing else the user keeps there).
RUN_FILES = (
    PLAN_FILE,
    "plan.json",
    "metrics.jsonl",
    "summary.json",
    "eval_predictions.jsonl",
    "generations.jsonl",
    "tensorboard",
    "adapter",
    "model",
    "adapter.tmp",
    "model.tmp",
    "checkpoints",
    "logs",
)

_held: list[IO] = []  # locks this process holds until it exits


def claim(plan: Plan) -> Plan:
    """Claim the plan's run directory for this process and write the plan into it; returns the plan (with the
    name actually taken, for a default directory). Raises ConfigError naming the directory and the fix."""
    base = plan.config.output_dir
    for n in range(1, 1000):
        folder = base if n == 1 else f"{base}-{n}"
        lock = _lock(folder)
        if lock is None:
            if plan.output_dir_given:
                raise ConfigError(
                    f"output_dir={base}: another run is in progress there (it holds {os.path.join(base, LOCK)}); "
                    f"give another output_dir"
                )
            continue
        try:
            deleted = earlier_files(folder, plan.config)
        except ConfigError:
            _release(lock)
            if plan.output_dir_given:
                raise
            continue  # a default name already taken: the next one
        if deleted:
            print(f"overwrite=true: deleting the earlier run's {', '.join(deleted)} in {folder}", file=sys.stderr)
            _clear(folder, deleted)
        if folder != base:
            plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, output_dir=folder))
        write_atomic(os.path.join(folder, PLAN_FILE), plan.to_json())
        _held.append(lock)
        return plan
    raise ConfigError(f"output_dir={base}: 999 runs with this name already; give output_dir")


def earlier_files(folder: str, cfg) -> list[str]:
    """What claiming `folder` for a run of `cfg` deletes (overwrite=true over an earlier launcher run: the names
    of that run's files), or a ConfigError when the folder cannot be used as it is: an earlier run without
    overwrite=true or resume, a config.json no launcher run wrote, files named like a run's outputs that no run
    wrote, a symbolic link where a run writes. Reads only: `--dry-run` shows the same answer the run acts on."""
    if not os.path.isdir(folder):
        return []
    links = [n for n in (LOCK, *RUN_FILES) if os.path.islink(os.path.join(folder, n))]
    if links:
        shown = ", ".join(f"{n} (to {os.readlink(os.path.join(folder, n))})" for n in links)
        raise ConfigError(
            f"output_dir={folder}: {shown} is a symbolic link where a run writes its own files (it would write "
            f"through it): remove the link, or give another output_dir"
        )
    present = [n for n in RUN_FILES if os.path.lexists(os.path.join(folder, n)) and not _batch_logs_only(folder, n)]
    previous = os.path.join(folder, PLAN_FILE)
    if not os.path.exists(previous):
        if present:
            raise ConfigError(
                f"output_dir={folder} holds {', '.join(present)}, named like a run's outputs but written by no "
                f"launcher run (it has no plan of one): a run would replace them; move them, or give another "
                f"output_dir"
            )
        return []
    if not is_plan(previous):
        raise ConfigError(
            f"output_dir={folder} holds a {PLAN_FILE} that no launcher run wrote (it is not a launcher plan), so "
            f"the folder is not a run's to replace, overwrite=true or not: give another output_dir (a new or empty "
            f"folder)"
        )
    if cfg.resume:  # a resumed run goes on in its folder: its checkpoints and metrics stay
        return []
    if not cfg.overwrite:
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(previous)))
        raise ConfigError(
            f"output_dir={folder} already holds a run (its {PLAN_FILE} was written {written}): give another "
            f"output_dir, add resume=auto to continue it from its newest checkpoint, or add overwrite=true to "
            f"replace it"
        )
    return present


def is_plan(path: str) -> bool:
    """Whether `path` is a plan a launcher run wrote: JSON with exactly a Plan's fields (another program's
    config.json, a model's say, has others)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    fields = {f.name for f in dataclasses.fields(Plan)}
    return isinstance(data, dict) and set(data) == fields and isinstance(data.get("config"), dict)


def _batch_logs_only(folder: str, name: str) -> bool:
    """`logs/` holding only Slurm's output of the job `launcher sbatch` wrote (the job's first start claims the
    folder its script already writes into)."""
    path = os.path.join(folder, name)
    if name != "logs" or not os.path.isdir(path):
        return False
    return all(re.fullmatch(r"slurm-\d+\.out", entry) for entry in os.listdir(path))


def claim_rerun(plan: Plan) -> Plan:
    """Claim the run directory of a plan given with --plan by hand (not by the launcher that made it): refused
    while another run holds it, or once it holds that run's results (rerunning would mix two runs)."""
    folder = plan.config.output_dir
    lock = _lock(folder)
    if lock is None:
        raise ConfigError(f"output_dir={folder}: another run is in progress there; wait for it, or plan a new run")
    results = [n for n in RUN_FILES[1:] if os.path.lexists(os.path.join(folder, n))]
    if results:
        _release(lock)
        raise ConfigError(
            f"output_dir={folder} already holds this plan's results ({', '.join(results)}): rerunning would mix "
            f"two runs; run the recipe with its settings and another output_dir (or overwrite=true)"
        )
    _held.append(lock)
    return plan


def release_claims() -> None:
    """Give up every run directory this process claimed: for a process that runs one run after another in the same
    process (a run's own process keeps its claim until it exits)."""
    while _held:
        _release(_held.pop())


def claimed_by_launcher(plan: Plan) -> bool:
    return os.environ.get(CLAIMED) == os.path.abspath(plan.config.output_dir)


def _lock(folder: str) -> IO | None:
    """This process's exclusive lock on `folder` (made if needed), or None when another process holds it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    try:  # never through a link: the lock would create or lock a file elsewhere
        handle = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644), "a")
    except OSError as e:
        if not os.path.islink(path):
            raise
        raise ConfigError(
            f"output_dir={folder}: {LOCK} is a symbolic link (to {os.readlink(path)}) where a run keeps its lock: "
            f"remove the link, or give another output_dir"
        ) from e
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _release(handle: IO) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _clear(folder: str, names: list[str]) -> None:
    """Delete the files an earlier run wrote (and only those)."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

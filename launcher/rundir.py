"""Claiming a run directory: one run per directory, decided atomically, held for the whole run.

The claimer (the launcher, or rank 0 of a direct form) takes an exclusive lock on `output_dir/.lock` and keeps it
until it exits, then writes the plan. A directory whose lock is held has a run in progress: refused. One that holds
a plan from an earlier run: refused unless `overwrite=true`, which deletes that run's files first. A default run
directory (the user named none) is never refused: the next free name (`-2`, `-3`, ...) is taken instead, so jobs
of a sweep started in the same second each get their own."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
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
        previous = os.path.join(folder, PLAN_FILE)
        if os.path.exists(previous):
            if not plan.output_dir_given:
                _release(lock)
                continue
            if not plan.config.resume:  # a resumed run goes on in its folder: its checkpoints and metrics stay
                if not plan.config.overwrite:
                    _release(lock)
                    written = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(previous)))
                    raise ConfigError(
                        f"output_dir={base} already holds a run (its {PLAN_FILE} was written {written}): give "
                        f"another output_dir, add resume=auto to continue it from its newest checkpoint, or add "
                        f"overwrite=true to replace it"
                    )
                _clear(folder)
        if folder != base:
            plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, output_dir=folder))
        write_atomic(os.path.join(folder, PLAN_FILE), plan.to_json())
        _held.append(lock)
        return plan
    raise ConfigError(f"output_dir={base}: 999 runs with this name already; give output_dir")


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
    handle = open(os.path.join(folder, LOCK), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _release(handle: IO) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _clear(folder: str) -> None:
    """Delete the files an earlier run wrote (and only those)."""
    for name in RUN_FILES:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

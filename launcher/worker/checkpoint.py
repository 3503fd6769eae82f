"""Writing and reading checkpoints (launcher.checkpoints decides where, which and what may differ).

A checkpoint holds the trained parameters and their optimizer state whole, gathered by the engine one tensor at a
time into safetensors shards (`trained-*.safetensors`), so its content does not depend on the number of processes
that wrote it; beside them `state.pt` (optimizer scalars and hyperparameters, the schedule, the loss scaler, every
rank's random generators) and `manifest.json`, written last: the step, the data position, the configuration, the
world size and a checksum of every file. An adapter run's checkpoint holds the adapter only (the frozen base comes
from `model=`). Written in `step-N.tmp`, each file fsynced, then renamed: a save killed halfway leaves no folder
that looks complete, and the previous checkpoint stays the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from launcher import checkpoints
from launcher.errors import ConfigError
from launcher.files import ordinary_modes
from launcher.overrides import to_dict
from launcher.shards import write_shards
from launcher.tracking import masked_settings
from launcher.worker import dist
from launcher.worker.strategies.base import Engine
from launcher.worker.watchdog import beating

STEM = "trained"
STATE = "state.pt"
RECIPE_COPY = "recipe.py"
"""The recipe that wrote the checkpoint, copied into it (its checksum in the manifest): `launcher export` rebuilds
the model with this copy, never with a path the manifest names."""
SHARD_MB = 1000


@dataclass(frozen=True)
class Position:
    """Where training stands after an optimizer step."""

    step: int
    """Optimizer steps done."""
    epoch: int
    """The epoch under way."""
    batches_done: int
    """Micro-batches of that epoch each rank has trained (the sampler skips them on resume)."""


@dataclass(frozen=True)
class Resume:
    """A checkpoint chosen and checked for this run."""

    path: str
    manifest: dict
    note: str
    """What the run log says about it."""

    def position(self, grad_accum: int) -> Position:
        """Where the run goes on, for a job accumulating `grad_accum` micro-batches per step (it may differ from
        the checkpoint's when the number of processes does)."""
        m = self.manifest
        done = checkpoints.resumed_batches_done(m["batches_done"], m["config"]["train"]["grad_accum"], grad_accum)
        return Position(step=m["step"], epoch=m["epoch"], batches_done=done)


def save(
    engine: Engine,
    cfg,
    position: Position,
    ranks: dist.Ranks,
    *,
    recipe: str = "",
    selection: dict | None = None,
    protect: int | None = None,
    extra: dict | None = None,
) -> str:
    """Write a checkpoint of the run at `position` (of the recipe at path `recipe`; `selection`: the state of the
    metric it follows, launcher.selection); returns its folder. Pruning keeps the checkpoint of step `protect` (the
    best). `extra`: more of the run's state, alike on every rank (AdaLoRA's budget), kept with the scalars.
    Collective: call on every rank."""
    final = os.path.join(checkpoints.root(cfg.output_dir), checkpoints.folder_name(position.step))
    tmp = final + ".tmp"
    rng = dist.gather_objects(_rng_state())
    scalars, tensors = engine.train_state()
    tensors = beating(tensors, "saving a checkpoint")
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write_shards(tmp, tensors, shard_mb=SHARD_MB, stem=STEM)
        # Filled while the tensors were gathered (the optimizer's per-parameter scalars), so written after them.
        torch.save({**scalars, "rng": rng, **(extra or {})}, os.path.join(tmp, STATE))
        if recipe:  # the recipe's own copy, under the manifest's checksum: what `launcher export` rebuilds with
            shutil.copyfile(recipe, os.path.join(tmp, RECIPE_COPY))
        files = {name: _describe(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        manifest = {
            "format": checkpoints.FORMAT,
            "step": position.step,
            "epoch": position.epoch,
            "batches_done": position.batches_done,
            "world_size": ranks.world_size,
            "recipe": recipe,
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            "config": masked_settings(to_dict(cfg)),
            "files": files,
            **({"selection": selection} if selection else {}),
        }
        with open(os.path.join(tmp, checkpoints.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        ordinary_modes(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a checkpoint of this very step (a resumed run saves it again)
        os.replace(tmp, final)
        _fsync_dir(os.path.dirname(final))
        _prune(cfg.output_dir, cfg.checkpoint.keep, protect)
    else:
        for _ in tensors:  # the same collectives, in the same order, as rank 0's writes
            pass
    torch.distributed.barrier()
    return final


def choose(cfg, ranks: dist.Ranks) -> Resume | None:
    """The checkpoint this run resumes from (None: a fresh start), checked: every file against its checksum, the
    configuration against this run's, the world size against this job's. Rank 0 reads and decides; every rank
    gets the same answer or the same ConfigError."""
    outcome: tuple[Resume | None, list[str]] = (None, [])
    if ranks.is_main:
        try:
            outcome = (_choose(cfg, ranks.world_size), [])
        except ConfigError as e:
            outcome = (None, e.problems)
    chosen, problems = dist.broadcast_object(outcome)
    if problems:
        raise ConfigError(problems)
    return chosen


def load(
    engine: Engine,
    chosen: Resume,
    ranks: dist.Ranks,
    *,
    grad_accum: int,
    restore: Callable[[dict], None] | None = None,
) -> Position:
    """Give the engine the checkpoint's trained state, and this rank its random generators back; returns where
    training goes on for a job accumulating `grad_accum` micro-batches per step. `restore(state)` takes back what
    `save` was given as `extra`."""
    keys, tensor = stored_tensors(chosen.path)
    state = torch.load(os.path.join(chosen.path, STATE), weights_only=True)
    engine.load_train_state(state, keys, tensor)
    if restore is not None:
        restore(state)
    # Each rank's own generators; a rank the checkpoint's job did not have keeps the ones it started with.
    if ranks.rank < len(state["rng"]):
        _set_rng_state(state["rng"][ranks.rank])
    return chosen.position(grad_accum)


def stored_tensors(path: str) -> tuple[set[str], Callable[[str], torch.Tensor]]:
    """A checkpoint's tensor names ("param/NAME", "optim/NAME/KEY") and a reader of one of them, whole."""
    from safetensors import safe_open

    with open(os.path.join(path, f"{STEM}.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    handles = {name: safe_open(os.path.join(path, name), "pt") for name in set(weight_map.values())}

    def tensor(key: str) -> torch.Tensor:
        return handles[weight_map[key]].get_tensor(key)

    return set(weight_map), tensor


def damage(path: str) -> list[str]:
    """What is wrong with the checkpoint folder `path` itself: no manifest, another format, a file missing or
    not matching its checksum (each named); empty when it is whole."""
    manifest_path = os.path.join(path, checkpoints.MANIFEST)
    if not os.path.isfile(manifest_path):
        return [f"damaged: {path} is not a complete checkpoint (no {checkpoints.MANIFEST})"]
    try:
        manifest = manifest_of(path)
    except (OSError, ValueError) as e:
        return [f"damaged: {manifest_path} cannot be read ({e})"]
    if manifest.get("format") != checkpoints.FORMAT:
        return [f"{path} is a checkpoint of format {manifest.get('format')}; this launcher reads {checkpoints.FORMAT}"]
    problems = []
    for name, want in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"damaged: {file} is missing")
        elif _describe(file) != want:
            problems.append(f"damaged: {file} does not match its checksum in {checkpoints.MANIFEST}")
    if not problems:
        problems += _unsafe_state(os.path.join(path, STATE))
    return problems


def _unsafe_state(path: str) -> list[str]:
    """`state.pt` read as `load` reads it (tensors and plain values only): a file holding anything else is not one
    the launcher wrote, and is never unpickled in full (that runs whatever code it names)."""
    import pickle

    if not os.path.isfile(path):
        return []
    try:
        torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # torch's message advises weights_only=False, the unsafe way: only what it found is said.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it names {found.group(1)}" if found else "it holds more than tensors and plain values"
        return [
            f"damaged: {path} cannot be read safely ({what}); the launcher never writes such a file: resume from "
            "another checkpoint"
        ]
    return []


def _choose(cfg, world_size: int) -> Resume | None:
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        problems = _check(cfg.resume, cfg, world_size)
        if problems:
            raise ConfigError([f"resume={cfg.resume}: {p}" for p in problems])
        return Resume(cfg.resume, manifest_of(cfg.resume), f"resumed from {cfg.resume}")
    skipped = []
    for step, path in reversed(checkpoints.complete(cfg.output_dir)):
        problems = _check(path, cfg, world_size)
        damaged = [p for p in problems if p.startswith("damaged")]
        if problems and len(damaged) == len(problems):
            skipped.append(f"{checkpoints.folder_name(step)} ({damaged[0]})")
            continue
        if problems:  # readable but not this run's: an error, never a silent fresh start
            raise ConfigError([f"resume=auto: {path}: {p}" for p in problems])
        note = f"resumed from {path} (step {step})"
        if skipped:
            note += "; skipped the newer " + ", ".join(skipped)
        return Resume(path, manifest_of(path), note)
    if skipped:
        raise ConfigError(
            [f"resume=auto: no readable checkpoint in {checkpoints.root(cfg.output_dir)}: " + "; ".join(skipped)]
        )
    return None


def _check(path: str, cfg, world_size: int) -> list[str]:
    """What stops `path` from resuming this run: damaged files (each named), another format, configuration or
    world size."""
    problems = damage(path)
    if problems:
        return problems
    manifest = manifest_of(path)
    differs = checkpoints.differences(manifest["config"], to_dict(cfg), type(cfg))
    if differs:
        problems.append(
            "it was written with other settings that change the training: "
            + "; ".join(differs)
            + " (give the checkpoint's values, or start a new run without resume=)"
        )
    saved_batch = checkpoints.global_batch(manifest["config"], manifest["world_size"])
    batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    if batch != saved_batch:
        try:
            keep = checkpoints.accumulation_for(
                manifest["config"], manifest["world_size"], cfg.train.micro_batch_size, world_size
            )
            problems.append(
                f"its global batch is {saved_batch} examples per step, this job's {batch}: train.grad_accum={keep} "
                f"keeps it on {world_size} processes"
            )
        except ValueError as e:
            problems.append(str(e))
    return problems


def manifest_of(path: str) -> dict:
    with open(os.path.join(path, checkpoints.MANIFEST)) as f:
        return json.load(f)


def _describe(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        os.fsync(f.fileno())  # on disk before the manifest says the checkpoint is complete
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(output_dir: str, keep: int, protect: int | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints (and `protect`), and folders of saves that never
    finished."""
    found = checkpoints.complete(output_dir)
    paths = dict(found)
    for step in checkpoints.to_delete([s for s, _ in found], keep, protect):
        shutil.rmtree(paths[step], ignore_errors=True)
    where = checkpoints.root(output_dir)
    for name in os.listdir(where):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(where, name), ignore_errors=True)


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

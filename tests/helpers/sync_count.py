"""Run a recipe in this process with every read of a tensor's value on the host counted (`.item()`, `.tolist()`,
`float(t)`, `int(t)`, `bool(t)`, `.numpy()`: each one a device-to-host sync on a GPU), while the training loop runs
its steps: evaluation and data loading (host tensors, in loader workers on GPUs) are left out.

    python tests/helpers/sync_count.py OUT.json RECIPE [SETTING ...]
    torchrun --nproc_per_node 2 tests/helpers/sync_count.py 'OUT-{rank}.json' RECIPE [SETTING ...]

OUT.json: {"steps": {STEP: [[file, function, line], ...]}}: each read made by our code (launcher/, recipes/) after
step STEP ended and before the next one did (STEP 0: before the first ended), and "library": {"file:function": count}
of the other reads.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OURS = (str(ROOT / "launcher"), str(ROOT / "recipes"))
state = {"on": False, "step": 0, "reads": {}, "library": {}}


def _counted(name: str):
    real = getattr(torch.Tensor, name)

    def read(self, *args, **kwargs):
        if state["on"]:
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if where.startswith(OURS):
                at = [where.removeprefix(str(ROOT) + "/"), frame.f_code.co_name, frame.f_lineno]
                state["reads"].setdefault(state["step"], []).append(at)
            else:
                key = f"{where.rsplit('site-packages/', 1)[-1]}:{frame.f_code.co_name}"
                state["library"][key] = state["library"].get(key, 0) + 1
        return real(self, *args, **kwargs)

    setattr(torch.Tensor, name, read)


def _paused(fn):
    def call(*args, **kwargs):
        was, state["on"] = state["on"], False
        try:
            return fn(*args, **kwargs)
        finally:
            state["on"] = was

    return call


def main() -> None:
    out, recipe, *settings = sys.argv[1:]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        _counted(name)
    from torch.utils.data import dataloader

    from launcher.worker import loop
    from launcher.worker.runlog import RunLog

    dataloader._BaseDataLoaderIter.__next__ = _paused(dataloader._BaseDataLoaderIter.__next__)
    loop.evaluate = _paused(loop.evaluate)
    real_train, real_tick = loop.train, RunLog.tick

    def train(*args, **kwargs):
        state["on"] = True
        try:
            return real_train(*args, **kwargs)
        finally:
            state["on"] = False  # written here: a rank of a group ends with os._exit (worker.main._exit)
            Path(out.format(rank=os.environ.get("RANK", "0"))).write_text(
                json.dumps({"steps": state["reads"], "library": state["library"]})
            )

    def tick(self, step):
        state["step"] = step
        real_tick(self, step)

    loop.train, RunLog.tick = train, tick
    sys.argv = [recipe, *settings]
    try:
        runpy.run_path(recipe, run_name="__main__")
    finally:
        Path(out.format(rank=os.environ.get("RANK", "0"))).write_text(
            json.dumps({"steps": state["reads"], "library": state["library"]})
        )


if __name__ == "__main__":
    main()

"""recipes/lora_cls.py with one fault injected, chosen by the FAULT variable (for the watchdog and restart tests):

- hang:RANK:STEP           rank RANK sleeps inside the per-step all-reduce of its STEP-th step; the others wait
- die-once:RANK:STEP:FILE  rank RANK kills itself (SIGKILL) in its STEP-th step's all-reduce, unless FILE exists
                           (it creates FILE first): one death, however often the job is started
- die-saving:RANK:STEP:FILE the same, halfway through writing the checkpoint of step STEP: its tensors and state
                           written, not its manifest
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import torch

import launcher

_spec = importlib.util.spec_from_file_location(
    "lora_cls_base", Path(__file__).resolve().parents[2] / "recipes/lora_cls.py"
)
_base = importlib.util.module_from_spec(_spec)
sys.modules["lora_cls_base"] = _base
_spec.loader.exec_module(_base)

Config = _base.Config
check = _base.check
build_task = _base.build_task
eval_outputs = _base.eval_outputs
compute_metrics = _base.compute_metrics


def build_model(cfg, task):
    fault = os.environ.get("FAULT", "")
    if fault:
        _inject(*fault.split(":"))
    return _base.build_model(cfg, task)


def _inject(kind: str, rank: str, step: str, marker: str = "") -> None:
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    if kind == "die-saving":
        from launcher import checkpoints
        from launcher.worker import checkpoint

        describe = checkpoint._describe

        def die_before_the_manifest(path):
            if f"{checkpoints.folder_name(int(step))}.tmp" in path and not os.path.exists(marker):
                Path(marker).write_text("died saving")
                os.kill(os.getpid(), signal.SIGKILL)
            return describe(path)

        checkpoint._describe = die_before_the_manifest
        return
    real, steps = torch.distributed.all_reduce, [0]

    def all_reduce(tensor, *args, **kwargs):
        if tensor.dtype == torch.float64 and tensor.numel() == 4:  # the loop's per-step statistics
            steps[0] += 1
            if steps[0] == int(step):
                if kind == "hang":
                    time.sleep(600)
                elif kind == "die-once" and not os.path.exists(marker):
                    Path(marker).write_text("died once")
                    os.kill(os.getpid(), signal.SIGKILL)
        return real(tensor, *args, **kwargs)

    torch.distributed.all_reduce = all_reduce


def main() -> None:
    launcher.run_recipe(sys.modules[__name__])


if __name__ == "__main__":
    main()

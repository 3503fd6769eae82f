"""recipes/lora_cls.py with faults injected, chosen by the FAULT variable (comma-separated), for the watchdog and
restart tests; STEP is the training step (1 is the first):

- hang:RANK:STEP           rank RANK sleeps inside the per-step all-reduce of step STEP; the others wait
- die-once:RANK:STEP:FILE  rank RANK kills itself (SIGKILL) in step STEP's all-reduce, unless FILE exists (it
                           creates FILE first): one death, however often the job is started
- die-saving:RANK:STEP:FILE the same, halfway through writing the checkpoint of step STEP: its tensors and state
                           written, not its manifest
- raise:RANK:STEP          rank RANK raises RuntimeError("injected fault in step STEP") in that all-reduce
- stop-evaluating:RANK:STEP:FILE rank RANK sends itself SIGUSR1 (a preemption) in the evaluation after step STEP,
                           unless FILE exists (it creates FILE first)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

import launcher
from launcher.recipe import load_recipe

_base = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" / "lora_cls.py"))

Config = _base.Config
check = _base.check
build_task = _base.build_task
compute_metrics = _base.compute_metrics
_stop_evaluating: list[tuple[int, str]] = []  # (step, marker) of a stop-evaluating fault of this rank


def eval_outputs(outputs, batch):
    from launcher.worker import watchdog

    for step, marker in _stop_evaluating:
        if watchdog._current is not None and watchdog._current.step == step and not os.path.exists(marker):
            Path(marker).write_text("preempted while evaluating")
            os.kill(os.getpid(), signal.SIGUSR1)
    return _base.eval_outputs(outputs, batch)


def build_model(cfg, task):
    for fault in filter(None, os.environ.get("FAULT", "").split(",")):
        _inject(*fault.split(":"))
    return _base.build_model(cfg, task)


def _inject(kind: str, rank: str, step: str, marker: str = "") -> None:
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    if kind == "stop-evaluating":
        _stop_evaluating.append((int(step), marker))
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
    from launcher.worker import watchdog

    real = torch.distributed.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        if tensor.dtype == torch.int64 and tensor.numel() == 1:  # the loop's per-step reduction (dist.any_rank)
            # The watchdog knows the last step finished (the loop's beat); a resumed run starts from its checkpoint's.
            if watchdog._current is not None and watchdog._current.step + 1 == int(step):
                if kind == "hang":
                    time.sleep(600)
                elif kind == "raise":
                    print(f"rank {rank} is about to fail", flush=True)
                    raise RuntimeError(f"injected fault in step {step}")
                elif kind == "die-once" and not os.path.exists(marker):
                    Path(marker).write_text("died once")
                    os.kill(os.getpid(), signal.SIGKILL)
        return real(tensor, *args, **kwargs)

    torch.distributed.all_reduce = all_reduce


def main() -> None:
    launcher.run_recipe(sys.modules[__name__])


if __name__ == "__main__":
    main()

"""Stop requests during training: SIGTERM, SIGUSR1 or SIGUSR2 (a preemption: Slurm sends them to every task, the
launcher forwards them) are noted instead of killing the rank, which finishes its step; the loop then agrees with
the other ranks on the step, saves a checkpoint and stops (errors.Preempted, exit 75). After training, through the
final evaluation and the save, they are noted too and agreed between those phases (stop_after_training). Before
training the signals keep their defaults: there is nothing to save yet."""

from __future__ import annotations

import sys

from launcher.checkpoints import complete
from launcher.errors import REQUEUE_EXIT_CODE, Preempted
from launcher.signals import PREEMPT, NotedSignals, signal_name
from launcher.worker import dist


def stop_requests() -> NotedSignals:
    """Open while the loop trains, and again from its end to the saved model: `received` is the first stop signal,
    or 0."""
    return NotedSignals(PREEMPT)


def stop_after_training(requests, steps: int, cfg, ranks, coming: str, last: bool = False) -> None:
    """Stop (Preempted, exit 75) when any rank was asked to since training ended and a complete checkpoint holds
    the trained state; `coming` is what a resumed run does again. Collective: every rank calls it at the same
    point. Without a checkpoint the run goes on (said at the `last` check): what is ahead is the only way to keep
    the training."""
    if not dist.any_rank(requests.received):
        return
    found = complete(cfg.output_dir)
    if not found:
        if ranks.is_main and last:
            print(
                "launcher: a stop signal after training, with no checkpoint to resume from "
                "(checkpoint.every_steps=0): saving the model first",
                file=sys.stderr,
                flush=True,
            )
        return
    what = signal_name(requests.received) if requests.received else "a stop signal to another rank"
    step, path = found[-1]
    raise Preempted(
        f"{what} after training (step {steps}), before {coming}: checkpoint {path} (step {step}) holds the trained "
        f"state; rerun with resume=auto to continue (exit {REQUEUE_EXIT_CODE})"
    )

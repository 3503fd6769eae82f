"""Stop requests during training: SIGTERM, SIGUSR1 or SIGUSR2 (a preemption: Slurm sends them to every task, the
launcher forwards them) are noted instead of killing the rank, which finishes its step; the loop then agrees with
the other ranks on the step, saves a checkpoint and stops (errors.Preempted, exit 75). Outside training the
signals keep their defaults: there is nothing to save yet."""

from __future__ import annotations

from launcher.signals import PREEMPT, NotedSignals


def stop_requests() -> NotedSignals:
    """Open while the loop trains: `received` is the first stop signal, or 0."""
    return NotedSignals(PREEMPT)

"""Stop requests during training: SIGTERM, SIGUSR1 or SIGUSR2 (a preemption: Slurm sends them to every task, the
launcher forwards them) are noted instead of killing the rank, which finishes its step; the loop then agrees with
the other ranks on the step, saves a checkpoint and stops (errors.Preempted, exit 75). Outside training the
signals keep their defaults: there is nothing to save yet."""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequests:
    """While open, the first stop signal is noted in `received`; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

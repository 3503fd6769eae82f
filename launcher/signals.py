"""Signals noted instead of acted on, for the launcher (stop or pass on to its ranks) and for a training rank
(finish the step, checkpoint, stop)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

PREEMPT = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""Signals that ask a training job to checkpoint and stop (a preemption; see worker.preempt)."""


class NotedSignals:
    """While open, the first of `signals` to arrive is noted in `received` instead of ending the process; the
    previous handlers come back on exit. A signal in `keep_ignored` that was inherited as ignored stays ignored
    (nohup's SIGHUP). The handler only notes the signal: an exception raised in the middle of, say, starting a rank
    could leave that rank untracked."""

    def __init__(self, signals: Iterable[int], *, keep_ignored: Iterable[int] = ()) -> None:
        self.signals, self.keep_ignored = tuple(signals), set(keep_ignored)
        self.received: int = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> NotedSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python lets only the main thread set handlers; the caller's own handling applies
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if sig in self.keep_ignored and previous == signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is the nearest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"

"""A rank that stops advancing is stopped, and says where it was: a thread checks that training, evaluation or
saving made progress (`beat`) in the last `watchdog.timeout` seconds. When not, it writes every thread's Python
stacks to output_dir/logs/stacks-rank-N.txt (faulthandler) and a report, hang-rank-N.json (the step, how long,
where the main thread is and whether it waits for a peer), then ends the rank with HUNG_EXIT_CODE. The launcher
reads the reports of its ranks and names the one the others wait for.

Why a thread in each rank, not only a supervisor: the rank knows where it is (a supervisor sees a silent pid), and
the check works under every launcher (`launcher run`, torchrun, DeepSpeed's runner, Slurm's srun).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from launcher.errors import HUNG_EXIT_CODE
from launcher.files import write_atomic
from launcher.hangs import Report, report_path, stacks_path
from launcher.worker import ranklog

if TYPE_CHECKING:
    import torch

# Python files a main thread sits in while it waits for the other ranks: a collective (torch.distributed,
# DeepSpeed's comm and ZeRO's parameter fetches) or a backward whose gradient all-reduce waits for a peer (DDP).
WAITING_IN = (
    "torch/distributed/",
    "torch/autograd/",
    "torch/nn/parallel/",
    "deepspeed/comm/",
    "deepspeed/runtime/zero/",
)
SETTLE_SECONDS = 3.0
"""How long a rank that stalled waits before it exits: the ranks it waits for (or that wait for it) stalled at
the same moment, and their reports should be written before the launcher reads them."""


def describe_main_thread(frame) -> tuple[bool, str]:
    """(waiting for another rank, where): the innermost frame says whether the thread waits in a collective;
    `where` is the innermost frame outside torch/DeepSpeed, the code that called into them."""
    waiting = frame is not None and _waits(frame.f_code.co_filename)
    f = frame
    while f is not None and (_waits(f.f_code.co_filename) or "/torch/" in f.f_code.co_filename):
        f = f.f_back
    f = f or frame
    if f is None:
        return waiting, "unknown"
    return waiting, f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}"


def _waits(filename: str) -> bool:
    name = filename.replace(os.sep, "/")
    return any(part in name for part in WAITING_IN)


class Watchdog:
    """Open while a rank trains, evaluates and saves; `beat(step, phase)` marks progress."""

    def __init__(self, timeout: float, logs: str, rank: int) -> None:
        self.timeout, self.logs, self.rank = timeout, logs, rank
        self.step, self.phase = 0, "training"
        self._last = time.monotonic()
        self._done = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, name="launcher-watchdog", daemon=True)

    def beat(self, step: int | None = None, phase: str | None = None) -> None:
        self._last = time.monotonic()
        if step is not None:
            self.step = step
        if phase is not None:
            self.phase = phase

    def __enter__(self) -> Watchdog:
        global _current
        if self.timeout > 0:
            try:
                os.remove(report_path(self.logs, self.rank))  # an earlier run's
            except FileNotFoundError:
                pass
            _current = self
            self._last = time.monotonic()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        global _current
        _current = None
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                self._stop(idle)

    def _stop(self, idle: float) -> None:
        frame = sys._current_frames().get(self._main)
        waiting, where = describe_main_thread(frame)
        report = Report(
            rank=self.rank,
            host=socket.gethostname(),
            pid=os.getpid(),
            step=self.step,
            phase=self.phase,
            seconds=round(idle, 1),
            waiting=waiting,
            where=where,
        )
        os.makedirs(self.logs, exist_ok=True)
        stacks = stacks_path(self.logs, self.rank)
        with open(stacks, "a") as f:
            f.write(f"\n# rank {self.rank}: no progress for {idle:.0f} s ({self.phase}, step {self.step})\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        write_atomic(report_path(self.logs, self.rank), json.dumps(asdict(report), indent=2))
        how = "waits for another rank" if waiting else "is stuck"
        print(
            f"rank {self.rank}: no progress for {idle:.0f} s ({self.phase}, after step {self.step}); it {how} at "
            f"{where}; stacks: {stacks}",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(SETTLE_SECONDS)
        ranklog.stop()  # os._exit skips atexit: the rank's log gets the lines above
        os._exit(HUNG_EXIT_CODE)


_current: Watchdog | None = None
_stacks_file = None  # kept open: faulthandler writes to its descriptor when the signal comes


def stacks_on_sigquit(logs: str, rank: int) -> None:
    """`kill -QUIT` (the launcher's, when another rank failed) writes this rank's stacks to logs/stacks-rank-N.txt
    instead of stderr."""
    global _stacks_file
    os.makedirs(logs, exist_ok=True)
    _stacks_file = open(stacks_path(logs, rank), "a")
    faulthandler.register(signal.SIGQUIT, file=_stacks_file, all_threads=True)


def beat(step: int | None = None, phase: str | None = None) -> None:
    """Progress of this rank (a step, an eval batch, a tensor saved); nothing when no watchdog is open."""
    if _current is not None:
        _current.beat(step, phase)


@contextlib.contextmanager
def beating_forwards(module: torch.nn.Module, phase: str):
    """Every forward of `module` while open is a beat, in `phase`: work made of many forwards with nothing else to
    count (a recipe's generations) is progress as long as forwards are."""
    before = _current.phase if _current is not None else None
    beat(phase=phase)
    handle = module.register_forward_pre_hook(lambda *_: beat())
    try:
        yield
    finally:
        handle.remove()
        beat(phase=before)


def beating(items, phase: str):
    """`items`, with a beat before each (a tensor gathered and written, an eval batch), in `phase`; the phase
    before comes back once they are done."""
    before = _current.phase if _current is not None else None
    for item in items:
        beat(phase=phase)
        yield item
    beat(phase=before)

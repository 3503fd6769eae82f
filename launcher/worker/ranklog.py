"""Every rank's own log, output_dir/logs/rank{R}.log: what the rank printed, from Python or from C (a library's
warnings, faulthandler's dump of a crash, the traceback it died of), kept after the job ends.

A rank whose output is not a terminal (the launcher's other ranks, CI, Slurm, pdsh) has its stdout and stderr
file descriptors replaced by a pipe; a thread copies what comes through to where the output went before and to
the file, so nothing changes for whoever reads the output. A rank on a terminal keeps it (its progress bar redraws
in place, which a file would record ten times a second): its log holds the header and, if it fails, the
traceback. The launcher reads the log of a rank that failed for its failure summary (launcher.ranklogs).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
import traceback

from launcher.ranklogs import header, log_path

_tee: _Tee | None = None


class _Tee:
    def __init__(self, path: str):
        self.file = open(path, "ab", buffering=0)
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(write, fd)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._copy, name="rank-log", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        while chunk := os.read(self.read, 65536):
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.saved[1], view) :]
            self.file.write(chunk)

    def close(self) -> None:
        """Put the original descriptors back; the pipe then ends and the thread copies what is left."""
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
        self.thread.join(timeout=2.0)  # a child still holding the pipe (rare) must not hold the exit up
        os.close(self.read)
        self.file.close()


def start(logs: str, rank: int, world_size: int) -> str:
    """Open this rank's log (its header first) and send the rank's output into it too; returns its path."""
    global _tee
    os.makedirs(logs, exist_ok=True)
    path = log_path(logs, rank)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    terminal = os.isatty(1)
    with open(path, "w") as f:
        f.write(header(rank, world_size, socket.gethostname(), os.getpid(), started, terminal) + "\n")
    if terminal:
        sys.excepthook = _logging_excepthook(path, sys.excepthook)
    else:
        _tee = _Tee(path)
        atexit.register(stop)  # after an uncaught exception's traceback is printed
    return path


def stop() -> None:
    """Drain and close the log (before os._exit, which skips atexit)."""
    global _tee
    if _tee is not None:
        tee, _tee = _tee, None
        tee.close()


def _logging_excepthook(path: str, previous):
    def hook(kind, value, tb):
        with open(path, "a") as f:
            f.write("".join(traceback.format_exception(kind, value, tb)))
        previous(kind, value, tb)

    return hook

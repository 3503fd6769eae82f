"""Every rank's own log, output_dir/logs/rank{R}.log: what the rank printed, from Python or from C (a library's
warnings, faulthandler's dump of a crash, the traceback it died of), kept after the job ends.

A rank whose output is not a terminal (the launcher's other ranks, CI, Slurm, pdsh) has its stdout and stderr
file descriptors replaced by pipes; a small process of its own copies what comes through to where each went
before and to the file, so nothing changes for whoever reads the output, and nothing written just before a crash
is lost. A rank on a terminal keeps it (its progress bar redraws
in place, which a file would record ten times a second): its log holds the header and, if it fails, the
traceback. The launcher reads the log of a rank that failed for its failure summary (launcher.ranklogs).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
import traceback

from launcher.ranklogs import header, log_path

_tee: _Tee | None = None


# The copier: a process of its own, so that what a rank writes just before it dies (a C++ abort's message,
# faulthandler's dump) still reaches the file and the screen: it reads until the rank's last descriptor closes.
# It ignores the signals that stop a job (Ctrl-C's SIGINT to the terminal's group, Slurm's SIGTERM to every task):
# a copier gone first would break the rank's output while it saves its checkpoint.
COPIER = """
import os, selectors, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, signal.SIG_IGN)
log = os.open(sys.argv[3], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
sel = selectors.DefaultSelector()
sel.register(int(sys.argv[1]), selectors.EVENT_READ, 1)
sel.register(int(sys.argv[2]), selectors.EVENT_READ, 2)
while sel.get_map():
    for key, _ in sel.select():
        chunk = os.read(key.fd, 65536)
        if not chunk:
            sel.unregister(key.fd)
            continue
        for fd in (key.data, log):
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(fd, view):]
                except OSError:  # the screen went away: the log still gets it
                    break
"""


class _Tee:
    """fds 1 and 2 of this process become pipes into the copier, which writes each to where it went before (stdout
    stays stdout, stderr stderr) and both to the log. The rank keeps the pipes' read ends: should the copier end
    (killed by someone), the rank's writes never break (a pipe with no reader would fail them), and a new copier
    takes over from the same pipes, said once per copier lost."""

    def __init__(self, path: str):
        self.path = path
        pipes = {fd: os.pipe() for fd in (1, 2)}
        self.reads = {fd: read for fd, (read, _) in pipes.items()}  # kept (not inherited by the rank's children)
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        self.copier = self._start_copier()
        self.closing = threading.Event()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, (_, write) in pipes.items():
            os.dup2(write, fd)
            os.close(write)
        self.watcher = threading.Thread(target=self._replace_lost_copiers, name="launcher-log-copier", daemon=True)
        self.watcher.start()

    def _start_copier(self) -> subprocess.Popen:
        # Its stdout and stderr are where the rank's went before: never the pipes it reads (it would hold their
        # write ends, and never see them end).
        return subprocess.Popen(
            [sys.executable, "-S", "-c", COPIER, str(self.reads[1]), str(self.reads[2]), self.path],
            stdin=subprocess.DEVNULL,
            stdout=self.saved[1],
            stderr=self.saved[2],
            pass_fds=tuple(self.reads.values()),
        )

    def _replace_lost_copiers(self) -> None:
        while True:
            code = self.copier.wait()
            if self.closing.is_set():
                return
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            note = f"launcher: this rank's log copier (pid {self.copier.pid}) {how}; a new one copies from here\n"
            log = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            for fd in (self.saved[2], log):
                _write_all(fd, note.encode())
            os.close(log)
            self.copier = self._start_copier()

    def close(self) -> None:
        """Put the original descriptors back; the pipes then end and the copier writes what is left and exits."""
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        self.closing.set()
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
        try:
            self.copier.wait(timeout=2.0)  # a child of the rank still holding a pipe must not hold the exit up
        except subprocess.TimeoutExpired:
            pass
        for fd in (*self.saved.values(), *self.reads.values()):
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:  # the screen went away: the log still gets it
            return


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

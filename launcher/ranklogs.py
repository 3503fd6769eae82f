"""The per-rank logs (output_dir/logs/rank{R}.log, written by launcher.worker.ranklog) as the launcher reads them:
their header, and the failure summary of a rank that failed (pure: no torch).

    launcher: rank 1 on node-2 (pid 4242) failed first: RuntimeError: CUDA out of memory
    launcher: its last lines (runs/x/logs/rank1.log):
    launcher:   | ...
"""

from __future__ import annotations

import os
import re
import threading

HEADER = "# launcher rank log:"
PREFIX = re.compile(r"^(\[[^\]\s]+:\d+\] )?(\[rank\d+\]: )?")
"""The [host:rank] prefix a rank under DeepSpeed's multi-node runner puts before its lines (worker.prefix), and
the [rankN]: torch.distributed puts before the traceback of a rank's uncaught exception."""
EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning|Fault)\b.*")
FATAL = ("Fatal Python error:", "terminate called", "Segmentation fault", "Killed")
TAIL = 12


def log_path(logs: str, rank: int) -> str:
    return os.path.join(logs, f"rank{rank}.log")


def header(rank: int, world_size: int, host: str, pid: int, started: str, terminal: bool) -> str:
    output = "a terminal (only this header and a traceback are kept)" if terminal else "a pipe (copied here)"
    return f"{HEADER} rank {rank} of {world_size} on {host}, pid {pid}, started {started}, output to {output}"


def read_header(line: str) -> dict | None:
    """{rank, world_size, host, pid} of a header line, or None."""
    m = re.match(rf"{re.escape(HEADER)} rank (\d+) of (\d+) on (\S+), pid (\d+),", line)
    if m is None:
        return None
    rank, world, host, pid = m.groups()
    return {"rank": int(rank), "world_size": int(world), "host": host, "pid": int(pid)}


def exception_of(lines: list[str]) -> str | None:
    """What the rank died of: the last traceback's closing line ("RuntimeError: ..."), else a fatal error line
    (a C-level abort, faulthandler's report)."""
    lines = [PREFIX.sub("", line) for line in lines]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            if line and not line[0].isspace() and EXCEPTION.match(line):
                return line.strip()
    fatal = [line.strip() for line in lines if line.startswith(FATAL)]
    return fatal[-1] if fatal else None


def failure_summary(logs: str, rank: int, pid: int | None = None, tail: int = TAIL) -> list[str]:
    """The launcher's lines on a failed rank from its log: where it ran, what it died of, its last lines. Empty
    when there is no log of this rank (or only an earlier run's: another pid)."""
    path = log_path(logs, rank)
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    info = read_header(lines[0]) if lines else None
    if info is None or (pid is not None and info["pid"] != pid):
        return []
    body = [line for line in lines[1:] if line.strip()]
    died = exception_of(body)
    first = f"rank {rank} on {info['host']} (pid {info['pid']}) failed first" + (f": {died}" if died else "")
    shown = [f"  | {line}" for line in body[-tail:]]
    return [first, *([f"its last lines ({path}):", *shown] if shown else [f"its log ({path}) is empty"])]


WARNING = re.compile(r"warn", re.IGNORECASE)  # UserWarning, [WARNING], warnings.warn


class Repeats:
    """Warnings that several ranks print alike: the launcher shows the first copy and counts the others, then says
    how many ranks printed each (`summary`). Shared by the threads that stream the ranks' output."""

    def __init__(self):
        self._ranks: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def first(self, rank: int, line: str) -> bool:
        """Whether to show this line: anything but a warning another rank already printed."""
        if not WARNING.search(line):
            return True
        with self._lock:
            ranks = self._ranks.setdefault(line.strip(), [])
            ranks.append(rank)
            return len(ranks) == 1

    def summary(self) -> list[str]:
        with self._lock:
            repeated = {text: ranks for text, ranks in self._ranks.items() if len(ranks) > 1}
        return [_repeated(len(set(r)), len(r), t) for t, r in repeated.items()]


def _repeated(ranks: int, times: int, text: str) -> str:
    return f"{ranks} rank{'s' if ranks > 1 else ''} printed this warning {times} times, shown once: {text}"

"""What a stalled rank leaves in output_dir/logs (worker.watchdog writes, the launcher reads): its stacks and a
report saying where it is and whether it waits for another rank."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Report:
    """What hang-rank-N.json holds."""

    rank: int
    host: str
    pid: int
    step: int
    phase: str
    """What the rank was doing: training, evaluating, saving."""
    seconds: float
    """Since its last progress."""
    waiting: bool
    """Its main thread is inside a collective (or a backward waiting on one): it waits for another rank."""
    where: str
    """The main thread's innermost frame outside the libraries that wait, FILE:LINE in FUNC."""


def stacks_path(logs: str, rank: int) -> str:
    return os.path.join(logs, f"stacks-rank-{rank}.txt")


def report_path(logs: str, rank: int) -> str:
    return os.path.join(logs, f"hang-rank-{rank}.json")


def read_reports(logs: str, pids: dict[int, int]) -> dict[int, Report]:
    """The hang reports in `logs` written by these ranks (rank -> pid), not by an earlier run's."""
    found = {}
    for rank, pid in pids.items():
        try:
            report = Report(**json.loads(Path(report_path(logs, rank)).read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if report.pid == pid:
            found[rank] = report
    return found

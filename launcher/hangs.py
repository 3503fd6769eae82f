"""What a stalled rank leaves in output_dir/logs (worker.watchdog writes, the launcher reads): its stacks and a
report saying where it is and whether it waits for another rank; and what the reports of a job say (pure)."""

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


def logs_folder(output_dir: str) -> str:
    """Where a run's ranks leave their stacks and hang reports."""
    return os.path.join(output_dir, "logs")


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


def describe_hang(pids: dict[int, int], reports: dict[int, Report], logs: str) -> str:
    """The launcher's last line for a job whose watchdogs stopped it: the rank the others wait for (one stuck in its
    own code first, then one that never stalled while the others waited), where it is, and who waits for it; or,
    when every rank waits in a collective, where each one is."""
    lagging = [r for r in pids if r in reports and not reports[r].waiting]
    lagging += [r for r in pids if r not in reports]
    waiting = [r for r in pids if r in reports and reports[r].waiting]
    if not lagging:  # a collective only some ranks entered, or a peer lost on the network
        where = "; ".join(f"rank {k} at {v.where}" for k, v in sorted(reports.items()))
        step = min(v.step for v in reports.values())
        return (
            f"every rank waits in a collective after step {step} ({where}): a collective the ranks did not all "
            "call, or a peer lost on the network"
        )
    others = ""
    if waiting:
        others = f"; {ranks_named(waiting)} {'waits' if len(waiting) == 1 else 'wait'} for it in a collective"
    rank = lagging[0]
    report = reports.get(rank)
    if report is None:
        return f"rank {rank} (pid {pids[rank]}) kept running while the others stalled waiting for it{others}"
    return (
        f"rank {rank} (pid {pids[rank]}, {report.host}) made no progress for {report.seconds:.0f} s "
        f"({report.phase}, after step {report.step}): stuck at {report.where}{others}; stacks: "
        f"{os.path.join(logs, 'stacks-rank-N.txt')}"
    )


def ranks_named(numbers: list[int]) -> str:
    return f"rank {numbers[0]}" if len(numbers) == 1 else f"ranks {', '.join(map(str, numbers))}"

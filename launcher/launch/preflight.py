"""`launcher check`'s judgement, pure: each host's probe (launch/probe.py) against the first host's and against
its slots. One row per host; every problem names the host, what is wrong and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.hostfile import Host

MIN_FREE_BYTES = 2**30
"""Less free space than this where a run writes is a problem (checkpoints need room)."""


@dataclass
class Row:
    host: str
    slots: int
    report: dict | None
    """The probe's answer; None when the host gave none."""
    problems: list[str] = field(default_factory=list)


def judge(hosts: list[Host], reports: dict[str, dict | str], *, cuda: bool) -> list[Row]:
    """`reports`: host -> its probe's dict, or what went wrong reaching it (a string). `cuda`: the run uses GPUs
    (then each host needs a device per slot)."""
    rows = []
    first = next((r for h in hosts if isinstance(r := reports.get(h.name), dict)), None)
    for h in hosts:
        report = reports.get(h.name)
        if not isinstance(report, dict):
            rows.append(Row(h.name, len(h.slots), None, [f"{h.name}: {report or 'no answer'}"]))
            continue
        row = Row(h.name, len(h.slots), report)
        if first is not None and report is not first:
            for name, version in first["versions"].items():
                mine = report["versions"].get(name, "missing")
                if mine != version:
                    row.problems.append(
                        f"{h.name}: {name} {mine}, the first host ({hosts[0].name}) has {version}: install the same "
                        "version on every host"
                    )
        if cuda and report["gpus"] <= max(h.slots):
            row.problems.append(
                f"{h.name}: {report['gpus']} GPU(s), its slots need {max(h.slots) + 1}: lower slots= in the hostfile"
            )
        if not report["writable"]:
            row.problems.append(f"{h.name}: cannot write in {report['folder']}: fix its permissions or give output_dir")
        if report["free_bytes"] < MIN_FREE_BYTES:
            row.problems.append(
                f"{h.name}: {report['free_bytes'] / 2**30:.2f} GiB free in {report['folder']}: free some space"
            )
        rows.append(row)
    return rows

"""Hostfiles in DeepSpeed/MPI form and DeepSpeed-style --include/--exclude filters: pure functions.

A hostfile names one host per line with its slots (processes, usually GPUs) and may have comments and blank lines:

    # two nodes of 8 GPUs
    node-1 slots=8
    node-2 slots=8   # a trailing comment

A filter picks slots: `node-1@node-2:0,1` is every slot of node-1 and slots 0 and 1 of node-2 (DeepSpeed's
NODE_SPEC[@NODE_SPEC ...], NODE_SPEC = NAME[:SLOT[,SLOT ...]]). The result keeps the hostfile's order of hosts,
which is the order of node ranks. Where DeepSpeed's runner warns or ignores (a missing hostfile, a slot that does
not exist), these refuse, quoting the line and its number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from launcher.errors import ConfigError

HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
"""A host name or an IPv4 address (letters, digits, '-', '.', '_'; what ssh and pdsh take without quoting)."""
SLOTS = re.compile(r"^slots=(?P<n>\S*)$")


@dataclass(frozen=True)
class Host:
    name: str
    """The name ssh, pdsh or Slurm reaches the node by."""
    slots: tuple[int, ...]
    """The local ranks (GPU indices) this launch uses on it, in order."""


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    """The hosts of a hostfile's `text`, in order, each with slots 0..N-1. `source` names it in errors (its path).
    Every bad line is reported, each with its number and the line as written."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}, line {number}: {raw.strip()!r}"
        fields = line.split()
        name = fields[0]
        if not HOST_NAME.match(name):
            problems.append(f"{where}: {name!r} is not a host name (letters, digits, '-', '.', '_')")
            continue
        slot_fields = [f for f in fields[1:] if f.startswith("slots=")]
        others = [f for f in fields[1:] if not f.startswith("slots=")]
        if others or len(slot_fields) != 1:
            problems.append(f"{where}: write 'HOST slots=N', one host per line (e.g. '{name} slots=8')")
            continue
        count = SLOTS.match(slot_fields[0]).group("n")
        if not count.isdigit() or int(count) == 0:
            problems.append(f"{where}: slots={count} must be a whole number of processes, at least 1")
            continue
        if name in seen:
            problems.append(f"{where}: {name} is already on line {seen[name]}; give each host once, with all its slots")
            continue
        seen[name] = number
        hosts.append(Host(name, tuple(range(int(count)))))
    if problems:
        raise ConfigError(problems)
    if not hosts:
        raise ConfigError(f"{source}: no hosts; write one 'HOST slots=N' line per node")
    return hosts


def select(hosts: list[Host], include: str = "", exclude: str = "") -> list[Host]:
    """The hosts and slots an --include or --exclude filter leaves, in the hostfile's order (hosts left with no slot
    dropped). Both at once, an unknown host or slot, or a malformed filter is refused."""
    if include and exclude:
        raise ConfigError("--include and --exclude: give one of them, not both")
    spec, flag = (include, "--include") if include else (exclude, "--exclude")
    if not spec:
        return list(hosts)
    wanted = _parse_filter(spec, flag, {h.name: h for h in hosts})
    if include:
        out = [Host(h.name, h.slots if wanted[h.name] is None else wanted[h.name]) for h in hosts if h.name in wanted]
    else:
        out = []
        for h in hosts:
            drop = wanted.get(h.name, ())
            left = () if drop is None else tuple(s for s in h.slots if s not in drop)
            if left:
                out.append(Host(h.name, left))
    if not out:
        raise ConfigError(f"{flag}={spec}: leaves no slot on any host")
    return out


def _parse_filter(spec: str, flag: str, known: dict[str, Host]) -> dict[str, tuple[int, ...] | None]:
    """NAME[:SLOT[,SLOT ...]] joined by '@', as {host: its slots, or None for all of them}. A host named twice
    takes the slots of both parts, as DeepSpeed's runner does."""
    merged: dict[str, list[int]] = {}
    for part in spec.split("@"):
        name, colon, slot_text = part.partition(":")
        if name not in known:
            raise ConfigError(f"{flag}={spec}: no host {name!r} in the hostfile (it has {', '.join(known)})")
        slots = merged.setdefault(name, [])
        if not colon:
            continue
        try:
            asked = [int(s) for s in slot_text.split(",")]
        except ValueError:
            raise ConfigError(f"{flag}={spec}: {part!r} should be HOST or HOST:SLOT,SLOT (e.g. {name}:0,1)") from None
        missing = [s for s in asked if s not in known[name].slots]
        if missing:
            last = len(known[name].slots) - 1
            raise ConfigError(f"{flag}={spec}: {name} has slots 0-{last}, not {', '.join(map(str, missing))}")
        slots.extend(asked)
    return {name: tuple(sorted(set(slots))) if slots else None for name, slots in merged.items()}


def world(hosts: list[Host]) -> tuple[int, int]:
    """(nodes, processes) of a launch on `hosts`."""
    return len(hosts), sum(len(h.slots) for h in hosts)


def per_node(hosts: list[Host]) -> int:
    """The processes each node runs; ConfigError when the nodes differ (torchrun and srun start the same number on
    every node, and a plan has one number of processes per node)."""
    counts = {len(h.slots) for h in hosts}
    if len(counts) != 1:
        raise ConfigError(
            "every node must run the same number of processes (slots: "
            + ", ".join(f"{h.name}={len(h.slots)}" for h in hosts)
            + "): give each host the same slots, or pick equal slots with --include"
        )
    return counts.pop()

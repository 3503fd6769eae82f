"""Whether the kernel's OOM killer ended a rank that died by SIGKILL: the count of OOM kills of the memory cgroup the
launcher runs in (cgroup v2 `memory.events`, v1 `memory.oom_control`), read before the ranks start and again after,
else the kernel log's "Killed process PID" line, where either can be read."""

from __future__ import annotations

import os
import re
import subprocess

CGROUP_FS = "/sys/fs/cgroup"


def oom_kills(cgroup_file: str = "/proc/self/cgroup", fs: str = CGROUP_FS) -> int | None:
    """The OOM kills counted so far in this process's memory cgroup (and those below it, on v2); None where no
    count can be read."""
    try:
        with open(cgroup_file) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            candidates.append((os.path.join(fs, path.lstrip("/"), "memory.events"), "oom_kill"))
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            candidates.append((os.path.join(fs, "memory", path.lstrip("/"), "memory.oom_control"), "oom_kill"))
    for path, key in candidates:
        try:
            with open(path) as f:
                for entry in f.read().splitlines():
                    name, _, value = entry.partition(" ")
                    if name == key and value.strip().isdigit():
                        return int(value)
        except OSError:
            continue
    return None


def in_kernel_log(pid: int) -> bool | None:
    """Whether the kernel log says it killed `pid` for memory; None where the log cannot be read."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return re.search(rf"Killed process {pid}\b", out.stdout) is not None


def explain_sigkill(pid: int, kills_before: int | None, kills_after: int | None, logged: bool | None) -> str:
    """What the launcher says of a rank killed by SIGKILL (pure: the counts and the log's answer are given)."""
    memory = (
        "it ran out of memory: lower train.micro_batch_size or data.max_length, or see `launcher plan` for what fits"
    )
    if logged or (kills_before is not None and kills_after is not None and kills_after > kills_before):
        return f"the kernel's OOM killer ended pid {pid}: {memory}"
    if logged is False or (kills_before is not None and kills_after == kills_before):
        return f"pid {pid} was not ended by the kernel's OOM killer (none counted): something sent it SIGKILL"
    return (
        f"SIGKILL from outside the launcher is most often the kernel's OOM killer: {memory} (neither the memory "
        "cgroup's count nor the kernel log could be read here to confirm)"
    )

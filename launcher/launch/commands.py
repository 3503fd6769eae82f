"""Pure builders: a plan -> the exact command and environment of each rank. Nothing here spawns anything."""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field

SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)
"""Variables whose values are forwarded but never shown (logs, dry runs)."""


@dataclass(frozen=True)
class RankCommand:
    """One process of the job."""

    rank: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables set on top of the launcher's own environment."""


def local_commands(
    recipe: str,
    plan_path: str,
    nproc: int,
    master_port: int,
    *,
    python: str = sys.executable,
    cpu_count: int | None = None,
    environ: dict[str, str] | None = None,
) -> list[RankCommand]:
    """`nproc` ranks on this machine, rendezvous on 127.0.0.1:`master_port`, all reading `plan_path`."""
    environ = os.environ if environ is None else environ
    cores = cpu_count or os.cpu_count() or 1
    shared = {
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "PYTHONUNBUFFERED": "1",
        # Ranks share the cores; oversubscribed BLAS threads make every rank slower.
        "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", str(max(1, cores // nproc))),
    }
    argv = [python, recipe, "--plan", plan_path]
    return [RankCommand(rank=r, argv=argv, env={**shared, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]


def mask(name: str, value: str) -> str:
    return "***" if SECRET.search(name) else value


def render(cmd: RankCommand) -> str:
    """The command as a shell line, every value quoted and secrets masked."""
    env = " ".join(f"{k}={shlex.quote(mask(k, v))}" for k, v in sorted(cmd.env.items()))
    return f"{env} {shlex.join(cmd.argv)}"

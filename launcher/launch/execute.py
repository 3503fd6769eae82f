"""The one place that starts processes: run every rank, stream output, stop all when one fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from launcher.launch.commands import RankCommand

GRACE_SECONDS = 10.0


def run_local(commands: list[RankCommand]) -> int:
    """Run the ranks to completion. Rank 0 writes straight to this terminal (so its progress bar stays live);
    the others' lines are prefixed with their rank. Returns the first non-zero exit code, else 0."""
    procs: list[subprocess.Popen] = []
    threads = []
    try:
        for cmd in commands:
            env = {**os.environ, **cmd.env}
            if cmd.rank == 0:
                proc = subprocess.Popen(cmd.argv, env=env)
            else:
                proc = subprocess.Popen(cmd.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                t = threading.Thread(target=_prefix, args=(proc, f"[rank{cmd.rank}] "), daemon=True)
                t.start()
                threads.append(t)
            procs.append(proc)
        return _wait(procs)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=1.0)


def _prefix(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def _wait(procs: list[subprocess.Popen]) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the survivors, then SIGKILL whoever is still there after the grace period."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.time() + GRACE_SECONDS
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

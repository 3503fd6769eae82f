"""The node side of `launcher run --runner ssh|slurm`: started over ssh on every node as

    python -m launcher.launch.node HOST -- python -m torch.distributed.run ...

(and as each srun task as `... node --no-stdin - -- ...`), it runs that node's torchrun and makes sure nothing of
it outlives the launcher, which torchrun alone does not (a remote command is not signalled when its ssh connection
ends, and torchrun's workers run in sessions of their own, so a killed torchrun leaves them training):
- Rank lines get `[host:rank] ` prefixes (torchrun's, when it tees its ranks' output).
- It reads its stdin (not with --no-stdin: under srun), the launcher's side of the connection. A line `signal N`
  is passed on to torchrun (which passes it to the ranks: a preemption); the end of the input (the launcher
  stopped this node, or died, or the connection broke) stops torchrun and every process under it. SIGUSR1 and
  SIGUSR2 to it are passed on too (Slurm signals every task); SIGTERM, SIGHUP and SIGINT stop everything.
- It is a child subreaper: workers orphaned by a dead torchrun become its children, so stopping finds them all
  (SIGTERM, then SIGKILL after GRACE_SECONDS) and nothing is left on the node.
- torchrun exits 1 whatever its failing worker did; this reads torchrun's failure summary and ends with the
  first failing rank's code instead (128 + N for a signal; 75 for ranks that checkpointed on a preemption), after
  one line for the launcher (RESULT_MARK + JSON: the rank, its pid and its code), so that the launcher can name
  the rank, the host and how it ended.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from launcher.errors import CHECKPOINTED_MARK, NODE_SIDE, REQUEUE_EXIT_CODE

PREFIX_TEMPLATE = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"
"""torchrun's prefix for its ranks' lines (when it tees them): set to `[host:${rank}] ` unless given."""
RESULT_MARK = "@launcher-node-result "
"""Starts the node's last line: what its first failing rank did (read by the launcher, never shown)."""
GRACE_SECONDS = 10.0
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>
ROOT_CAUSE = "Root Cause (first observed failure):"
RANK_LINE = re.compile(r"^\s*rank\s*:\s*(\d+)")
EXIT_LINE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")


class Summary:
    """What torchrun's failure summary says of the first failing rank (its lines seen one at a time)."""

    def __init__(self) -> None:
        self.checkpointed = 0
        """Ranks that said they saved a checkpoint and stopped (CHECKPOINTED_MARK)."""
        self.in_root_cause = False
        self.rank: int | None = None
        self.code: int | None = None
        self.pid: int | None = None

    def see(self, line: str) -> bool:
        """Note what `line` says; False for a line meant for this side only (not to be shown)."""
        if line.rstrip().endswith(CHECKPOINTED_MARK):
            self.checkpointed += 1
            return False
        if ROOT_CAUSE in line:
            self.in_root_cause = True
        elif self.in_root_cause and self.code is None:
            rank, code = RANK_LINE.match(line), EXIT_LINE.match(line)
            if rank and self.rank is None:
                self.rank = int(rank.group(1))
            if code:
                self.code, self.pid = int(code.group(1)), int(code.group(2))
        return True


def main(argv: list[str]) -> int:
    listen = "--no-stdin" not in argv[:2]
    argv = [a for a in argv[:2] if a != "--no-stdin"] + argv[2:]
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m launcher.launch.node [--no-stdin] HOST|- -- COMMAND ...", file=sys.stderr)
        return 2
    host, command = argv[0], argv[2:]
    if host == "-":  # under srun: the node Slurm runs this task on
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    env = {PREFIX_TEMPLATE: f"[{host}:${{rank}}] ", **os.environ, NODE_SIDE: "1"}
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=env,
    )
    summary = Summary()
    reader = threading.Thread(target=_pass_on, args=(proc, summary, host), daemon=True)
    reader.start()
    stop = threading.Event()
    if listen:
        threading.Thread(target=_listen, args=(proc, stop), daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # a preemption (Slurm signals every task): to torchrun's ranks
        signal.signal(sig, lambda n, _: proc.poll() is None and proc.send_signal(n))
    while proc.poll() is None and not stop.is_set():
        time.sleep(0.1)
    if proc.poll() is None:
        _stop_all(proc)
    reader.join(timeout=2.0)
    _stop_all(proc)  # workers a dead torchrun left behind
    code = proc.wait()
    result = {"host": host, "rank": summary.rank, "pid": summary.pid, "code": summary.code, "torchrun": code}
    print(RESULT_MARK + json.dumps(result), flush=True)
    if code and summary.checkpointed and summary.code in (None, REQUEUE_EXIT_CODE):
        return REQUEUE_EXIT_CODE  # the ranks checkpointed on a preemption; torchrun ended on the signal
    if code and summary.code is not None:
        return 128 - summary.code if summary.code < 0 else summary.code or code
    return 128 - code if code < 0 else code


def _pass_on(proc: subprocess.Popen, summary: Summary, host: str) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        if summary.see(line):
            sys.stdout.write(line)
            sys.stdout.flush()


def _listen(proc: subprocess.Popen, stop: threading.Event) -> None:
    """The launcher's requests, one per line, until its side closes."""
    for line in sys.stdin:
        words = line.split()
        if len(words) == 2 and words[0] == "signal" and words[1].isdigit() and proc.poll() is None:
            proc.send_signal(int(words[1]))
    stop.set()


def _stop_all(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun and every process below this one, then SIGKILL whatever is left after the grace period."""
    targets = _descendants(os.getpid())
    if not targets:
        return
    for pid in targets:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and _descendants(os.getpid()):
        _reap(proc)
        time.sleep(0.1)
    for pid in _descendants(os.getpid()):
        _kill(pid, signal.SIGKILL)
    while _descendants(os.getpid()):
        _reap(proc)
        time.sleep(0.05)


def _reap(proc: subprocess.Popen) -> None:
    """Collect exited children: torchrun through Popen (which keeps its code), orphans adopted as subreaper by pid."""
    proc.poll()
    for pid in [p for p, parent in _processes(zombies=True) if parent == os.getpid() and p != proc.pid]:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _descendants(root: int) -> list[int]:
    """Live processes below `root` (zombies excluded), from /proc."""
    children: dict[int, list[int]] = {}
    for pid, parent in _processes():
        children.setdefault(parent, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _processes(zombies: bool = False) -> list[tuple[int, int]]:
    """(pid, parent pid) of every process, from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if zombies or state != "Z":
            out.append((int(name), int(ppid)))
    return out


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

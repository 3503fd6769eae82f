"""The one place that starts processes: run every rank, stream its output, stop all of them when one fails.

What `run_local` guarantees:
- Rank 0 writes straight to this terminal (its progress bar stays live); the others' lines are prefixed [host:rank].
- The first rank to fail stops the others, and the launcher's last line names it, its pid and how it ended
  ("rank 1 (pid 12345) was killed by SIGKILL", "rank 1 (pid 12345) exited with code 3"). The exit code follows
  the shell's convention: 128 + the signal that killed the rank, else the rank's own code.
- SIGTERM, SIGUSR1 or SIGUSR2 to the launcher (a preemption) is passed on to every rank; a training rank finishes
  its step, the ranks agree, save a checkpoint and exit with 75 (errors.REQUEUE_EXIT_CODE), and so does the
  launcher, its last line saying to rerun with resume=auto. A rank that is not training yet dies of the signal, and
  the launcher stops the others as below (128 + the signal). Ranks given the signal directly (Slurm signals every
  task) end the same way.
- SIGHUP or SIGINT to the launcher stop every rank and the launcher exits with 128 + that signal. SIGINT
  works even when it was inherited as ignored (bash ignores it for `cmd &` in a script); an inherited ignored
  SIGHUP is kept, so `nohup launcher run ...` still outlives its terminal.
- Stopping means SIGTERM to each live rank, then SIGKILL to any rank still there GRACE_SECONDS later; every rank
  is reaped before `run_local` returns.
- On Linux a rank is SIGKILLed by the kernel when the launcher dies, even by SIGKILL, so no rank outlives it.
- With `logs` (output_dir/logs), a failure first asks the ranks still running for their Python stacks (SIGQUIT:
  each writes logs/stacks-rank-N.txt); a rank's watchdog (worker.watchdog) that found it stalled leaves a report
  there, and the last line names the rank the others wait for, where it is stuck, and the stacks (exit 124).
- A warning that several of the other ranks print alike is shown once; the launcher then says how many printed it.
- A rank that failed (not a usage error or a divergence, which say it all themselves) is summed up from its own
  log (output_dir/logs/rankR.log, launcher.ranklogs): its host, the exception it died of, its last lines.
- `run_restarting` starts every rank again after a failure, up to `max_restarts` times (LAUNCHER_RESTART=N in
  their environment: they resume from the newest checkpoint), but not after a usage error, a divergence (it would
  come back at the same step), a preemption or a stop asked of the launcher.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.errors import DIVERGED_EXIT_CODE, HUNG_EXIT_CODE, REQUEUE_EXIT_CODE, USAGE_EXIT_CODE
from launcher.hangs import ranks_named
from launcher.launch.commands import RankCommand
from launcher.ranklogs import Repeats, failure_summary
from launcher.signals import PREEMPT, NotedSignals, signal_name

HOST = socket.gethostname()
"""In the prefix of the other ranks' lines: [host:rank], as the multi-node runners print them."""
GRACE_SECONDS = 10.0
"""How long a rank has to exit after SIGTERM before it gets SIGKILL."""
POLL_SECONDS = 0.1
PREEMPT_SIGNALS = PREEMPT  # passed on to the ranks, which note the same ones
STOP_SIGNALS = (*PREEMPT_SIGNALS, signal.SIGHUP, signal.SIGINT)
PREEMPT_SECONDS = 600.0
"""How long ranks asked to checkpoint and stop may take (their step under way, then the save) before they are
stopped anyway."""
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
SETTLE_SECONDS = 1.0
"""After a first failure, how long the other ranks have to end on their own (a peer's death breaks their
collective): the rank that died first is named, not one that failed because of it."""
HUNG_SETTLE_SECONDS = 8.0
"""... and after a rank's watchdog stopped it: the ranks that stalled with it write their reports too."""
STACKS_SECONDS = 1.0
"""How long ranks asked for their stacks (SIGQUIT) have to write them before they are stopped."""
NO_RESTART = (USAGE_EXIT_CODE, DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE)


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen

    def describe(self, code: int) -> str:
        if code < 0:
            return f"rank {self.rank} (pid {self.proc.pid}) was killed by {signal_name(-code)}"
        return f"rank {self.rank} (pid {self.proc.pid}) exited with code {code}"


@dataclass
class Outcome:
    code: int
    message: str | None = None
    """The launcher's last line; None when every rank succeeded."""
    asked: bool = False
    """The launcher itself was asked to stop (a signal to it): never restarted."""
    details: list[str] = field(default_factory=list)
    """Lines printed before the last one (where the stacks are)."""
    failed: Rank | None = None
    """The rank whose exit this outcome reports."""

    @property
    def restartable(self) -> bool:
        return self.code != 0 and not self.asked and self.code not in NO_RESTART


def run_local(commands: list[RankCommand], logs: str | None = None) -> int:
    """Run the ranks to completion; returns 0, or the exit code described in the module docstring."""
    return _report(_run_once(commands, logs))


def run_restarting(make_commands: Callable[[int], list[RankCommand]], max_restarts: int, logs: str | None) -> int:
    """Like run_local, starting every rank again (the commands of restart N) after a failure that a restart can
    mend, up to `max_restarts` times; each restart is said on screen (and by the ranks, in the run log)."""
    reason = ""
    for restart in range(max_restarts + 1):
        commands = make_commands(restart)
        if restart:  # the ranks resume from the newest checkpoint and say why in the run log
            extra = {"LAUNCHER_RESTART": str(restart), "LAUNCHER_RESTART_REASON": reason}
            commands = [dataclasses.replace(c, env={**c.env, **extra}) for c in commands]
        outcome = _run_once(commands, logs)
        reason = outcome.message or ""
        if restart == max_restarts or not outcome.restartable:
            if outcome.restartable and max_restarts:
                outcome.message = f"{outcome.message}; no restart left (--max-restarts {max_restarts})"
            return _report(outcome)
        outcome.message = (
            f"{outcome.message}; starting every rank again from the newest checkpoint "
            f"(restart {restart + 1} of {max_restarts})"
        )
        _report(outcome)
    raise AssertionError("unreachable")


def _report(outcome: Outcome) -> int:
    for line in [*outcome.details, outcome.message]:
        if line:
            print(f"launcher: {line}", file=sys.stderr, flush=True)
    return outcome.code


def _run_once(commands: list[RankCommand], logs: str | None) -> Outcome:
    ranks: list[Rank] = []
    readers: list[threading.Thread] = []
    repeats = Repeats()  # the other ranks' copies of one warning: shown once, then counted
    # SIGHUP inherited as ignored stays ignored: `nohup launcher run ...` outlives its terminal.
    with NotedSignals(STOP_SIGNALS, keep_ignored=(signal.SIGHUP,)) as signals:
        try:
            from launcher.launch.oom import oom_kills

            oom_before = oom_kills()  # a rank that dies by SIGKILL: was it the kernel's OOM killer?
            ranks = _spawn(commands)
            readers = [_start_reader(r, repeats) for r in ranks if r.proc.stdout is not None]
            outcome = _wait(ranks, signals)
            if outcome.code and not outcome.asked and outcome.code != REQUEUE_EXIT_CODE:
                outcome = _failure(ranks, outcome, logs, oom_before)
        finally:
            _stop(ranks)
            for t in readers:
                t.join(timeout=1.0)  # a rank's own child may hold its pipe open: don't wait on it
    outcome.details = [*repeats.summary(), *outcome.details]
    return outcome


def _spawn(commands: list[RankCommand]) -> list[Rank]:
    """Start every rank from this thread (PR_SET_PDEATHSIG fires when the thread that forked ends, and this one
    outlives the ranks) and before any reader thread exists (a pre-exec hook runs in a child forked from a
    snapshot of every thread's locks; with no other thread of ours, none is held)."""
    arm = _die_with_launcher()
    ranks = []
    for cmd in commands:
        env = {**os.environ, **cmd.env}
        pipe = {} if cmd.rank == 0 else {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        try:
            ranks.append(Rank(cmd.rank, subprocess.Popen(cmd.argv, env=env, preexec_fn=arm, **pipe)))
        except BaseException:
            _stop(ranks)  # the caller never sees a half-started job
            raise
    return ranks


def _die_with_launcher() -> Callable[[], None] | None:
    """A pre-exec hook asking the kernel to SIGKILL the rank when the launcher dies (Linux only; elsewhere a
    launcher killed by SIGKILL cannot take its ranks along)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child should only make the call
    launcher = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != launcher:  # the launcher died before the request took effect: follow it now
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def _start_reader(rank: Rank, repeats: Repeats) -> threading.Thread:
    t = threading.Thread(target=_prefix, args=(rank, repeats), daemon=True)
    t.start()
    return t


def _prefix(rank: Rank, repeats: Repeats) -> None:
    for line in rank.proc.stdout:  # type: ignore[union-attr]
        if repeats.first(rank.rank, line):
            sys.stdout.write(f"[{HOST}:{rank.rank}] {line}")
            sys.stdout.flush()


def _wait(ranks: list[Rank], signals: NotedSignals) -> Outcome:
    """Until every rank succeeded, one failed, the ranks checkpointed and stopped (preemption), or the launcher
    was asked to stop (checked first: a Ctrl-C also reaches the ranks, whose own exits are then no failure)."""
    preempted: int | None = None  # the signal passed on to the ranks
    deadline = 0.0
    while True:
        sig = signals.received
        if sig and sig not in PREEMPT_SIGNALS:
            return Outcome(128 + sig, f"stopped every rank on {signal_name(sig)}", asked=True)
        if sig and preempted is None:
            preempted, deadline = sig, time.monotonic() + PREEMPT_SECONDS
            for r in ranks:
                if r.proc.poll() is None:
                    r.proc.send_signal(sig)
        for r in ranks:
            code = r.proc.poll()
            if code == REQUEUE_EXIT_CODE:
                deadline = deadline or time.monotonic() + PREEMPT_SECONDS  # signalled directly (Slurm): wait too
            elif code and preempted is not None:
                return Outcome(128 + preempted, f"stopped every rank on {signal_name(preempted)}", asked=True)
            elif code:
                return Outcome(shell_code(code), r.describe(code), failed=r)
        codes = [r.proc.returncode for r in ranks]
        if all(c == 0 for c in codes):
            return Outcome(0)
        if all(c in (0, REQUEUE_EXIT_CODE) for c in codes):
            what = f" ({signal_name(preempted)})" if preempted else ""
            return Outcome(
                REQUEUE_EXIT_CODE,
                f"every rank saved a checkpoint and stopped{what}: rerun with resume=auto to continue "
                f"(exit {REQUEUE_EXIT_CODE})",
            )
        if deadline and time.monotonic() > deadline:
            return Outcome(
                128 + (preempted or signal.SIGTERM),
                f"ranks still running {PREEMPT_SECONDS:g} s after being asked to checkpoint and stop",
                asked=preempted is not None,
            )
        time.sleep(POLL_SECONDS)


def _failure(ranks: list[Rank], first: Outcome, logs: str | None, oom_before: int | None) -> Outcome:
    """The failure to report, once the other ranks had a moment to end on their own: a rank killed by a signal
    before one that exited (its peers' collectives broke because it died), a rank the others wait for before the
    waiting ones (watchdog reports), else the first seen. The ranks still running write their stacks first."""
    _settle(ranks, HUNG_SETTLE_SECONDS if any(r.proc.poll() == HUNG_EXIT_CODE for r in ranks) else SETTLE_SECONDS)
    # Judged before the stacks are asked for: a rank that ends on that SIGQUIT is not a rank that was killed.
    killed = [r for r in ranks if (r.proc.returncode or 0) < 0]
    hung = any(r.proc.returncode == HUNG_EXIT_CODE for r in ranks)
    details = []
    alive = [r for r in ranks if r.proc.poll() is None]
    # A usage error is the user's to fix, said by the rank that found it: the others' stacks would only bury it.
    if logs is not None and alive and first.code != USAGE_EXIT_CODE:
        for r in alive:
            r.proc.send_signal(signal.SIGQUIT)
        time.sleep(STACKS_SECONDS)
        where = os.path.join(logs, "stacks-rank-N.txt")
        details.append(f"the Python stacks of {ranks_named([r.rank for r in alive])}, still running then: {where}")
    if logs is not None and hung:
        return _hang(ranks, logs, details)
    failed = killed[0] if killed else first.failed
    if logs is not None and failed is not None and failed.proc.returncode not in (USAGE_EXIT_CODE, DIVERGED_EXIT_CODE):
        # Where it ran, what it died of and its last lines, from its own log (a usage error or a divergence
        # already said all there is, on every rank alike).
        details = [*failure_summary(logs, failed.rank, failed.proc.pid), *details]
    if killed:
        r = killed[0]
        if r.proc.returncode == -signal.SIGKILL:
            from launcher.launch.oom import explain_sigkill, in_kernel_log, oom_kills

            after = oom_kills()
            logged = in_kernel_log(r.proc.pid) if after is None or after == oom_before else None
            details.append(explain_sigkill(r.proc.pid, oom_before, after, logged))
        return Outcome(shell_code(r.proc.returncode), r.describe(r.proc.returncode), details=details, failed=r)
    return Outcome(first.code, first.message, details=details, failed=first.failed)


def _hang(ranks: list[Rank], logs: str, details: list[str]) -> Outcome:
    from launcher.hangs import describe_hang, read_reports

    pids = {r.rank: r.proc.pid for r in ranks}
    return Outcome(HUNG_EXIT_CODE, describe_hang(pids, read_reports(logs, pids), logs), details=details)


def _settle(ranks: list[Rank], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(r.proc.poll() is None for r in ranks) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


def _stop(ranks: list[Rank]) -> None:
    """SIGTERM the live ranks, then SIGKILL whoever is still there after the grace period; reap them all."""
    alive = [r for r in ranks if r.proc.poll() is None]
    for r in alive:
        r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for r in alive:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(
                f"launcher: rank {r.rank} (pid {r.proc.pid}) still running {GRACE_SECONDS:g} s after SIGTERM; "
                "sending SIGKILL",
                file=sys.stderr,
                flush=True,
            )
            r.proc.kill()
            r.proc.wait()


def shell_code(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode

"""The launcher's side of a multi-node launch over ssh: start every node's command (launch/nodes.py builds them),
stream their output with `[host:rank]` prefixes, and stop every node when one fails.

What `run_nodes` guarantees:
- Each node runs `launcher.launch.node` (the node side) over ssh, whose stdin is this launcher's pipe: closing it
  stops that node's torchrun and every process under it, and so does this launcher's death (the connection
  ends), even by SIGKILL (ssh dies with it, PR_SET_PDEATHSIG).
- Rank lines come prefixed `[host:rank]` by torchrun (TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE); other lines of a
  node get `[host]`.
- The first node to fail stops the others, after SETTLE_SECONDS in which they may end on their own (a rank
  killed by a signal is named before ranks that failed because their peer died). The last line names the rank,
  its host, its pid and how it ended; the exit code is that rank's (128 + N for a signal), 255 for an ssh that
  could not reach its node.
- SIGTERM, SIGUSR1 or SIGUSR2 to the launcher is passed on to every node's ranks (a preemption: they checkpoint
  and exit 75, and so does the launcher); SIGHUP or SIGINT stop every node (exit 128 + the signal).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from launcher.errors import REQUEUE_EXIT_CODE
from launcher.launch.execute import PREEMPT_SIGNALS, STOP_SIGNALS, Outcome, _die_with_launcher, _report, shell_code
from launcher.launch.node import GRACE_SECONDS, RESULT_MARK
from launcher.launch.nodes import NodeCommand
from launcher.signals import NotedSignals, signal_name

SETTLE_SECONDS = 3.0
"""After a first node failed, how long the others have to end on their own (their ranks' collectives break)."""
STOP_SECONDS = GRACE_SECONDS + 5.0
"""How long a node asked to stop (its stdin closed) has before its ssh is killed."""
SSH_FAILED = 255
"""ssh's own exit code: the node was not reached, or the connection broke."""
POLL_SECONDS = 0.1


@dataclass
class Node:
    host: str
    proc: subprocess.Popen
    result: dict | None = None
    """The node side's last line: its first failing rank (rank, pid, code), or None if it never said."""
    last_lines: list[str] = field(default_factory=list)
    """Its last few lines (what ssh said, when it could not reach the node)."""

    def describe(self) -> str:
        code = self.proc.returncode
        r = self.result or {}
        if r.get("code") is not None and r.get("rank") is not None:
            c = r["code"]
            how = f"was killed by {signal_name(-c)}" if c < 0 else f"exited with code {c}"
            return f"rank {r['rank']} on {self.host} (pid {r['pid']}) {how}"
        if self.result is None and code == SSH_FAILED:
            said = f": {self.last_lines[-1].strip()}" if self.last_lines else ""
            return f"ssh to {self.host} failed (exit {SSH_FAILED}){said}"
        if code is not None and code < 0:
            return f"node {self.host}: its ssh (pid {self.proc.pid}) was killed by {signal_name(-code)}"
        return f"node {self.host} exited with code {code}"

    @property
    def killed_rank(self) -> bool:
        return (self.result or {}).get("code") is not None and self.result["code"] < 0


def run_nodes(commands: list[NodeCommand], *, capture: list[str] | None = None, timeout: float | None = None) -> int:
    """Run every node to completion; returns 0, or the exit code described in the module docstring. With `capture`,
    the nodes' lines are kept there instead of shown; with `timeout`, nodes still running then are stopped (124)."""
    nodes: list[Node] = []
    readers: list[threading.Thread] = []
    with NotedSignals(STOP_SIGNALS, keep_ignored=(signal.SIGHUP,)) as signals:
        try:
            nodes = _spawn(commands, quiet=capture is not None)
            readers = [threading.Thread(target=_read, args=(n, capture), daemon=True) for n in nodes]
            for t in readers:
                t.start()
            deadline = time.monotonic() + timeout if timeout else None
            outcome = _wait(nodes, signals, readers, deadline)
        finally:
            _stop(nodes)
            for t in readers:
                t.join(timeout=2.0)
    return _report(outcome)


def _spawn(commands: list[NodeCommand], quiet: bool = False) -> list[Node]:
    arm = _die_with_launcher()
    nodes: list[Node] = []
    for cmd in commands:
        if not quiet:
            print(f"launcher: starting {cmd.host}: {cmd.shown}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.Popen(
                cmd.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                preexec_fn=arm,
            )
        except BaseException:
            _stop(nodes)
            raise
        nodes.append(Node(cmd.host, proc))
    return nodes


def _read(node: Node, capture: list[str] | None = None) -> None:
    mine = f"[{node.host}:"
    for line in node.proc.stdout:  # type: ignore[union-attr]
        if line.startswith(RESULT_MARK):
            try:
                node.result = json.loads(line[len(RESULT_MARK) :])
            except ValueError:
                pass
            continue
        node.last_lines = [*node.last_lines[-4:], line]
        shown = line if line.startswith(mine) else f"[{node.host}] {line}"
        if capture is not None:
            capture.append(shown)
            continue
        sys.stdout.write(shown)
        sys.stdout.flush()


def _wait(
    nodes: list[Node], signals: NotedSignals, readers: list[threading.Thread], deadline: float | None = None
) -> Outcome:
    preempted: int | None = None
    while True:
        if deadline is not None and time.monotonic() > deadline:
            late = [n.host for n in nodes if n.proc.poll() is None]
            return Outcome(124, f"{', '.join(late)} still running after the time given; stopped")
        sig = signals.received
        if sig and sig not in PREEMPT_SIGNALS:
            return Outcome(128 + sig, f"stopped every node on {signal_name(sig)}", asked=True)
        if sig and preempted is None:
            preempted = sig
            for n in nodes:
                _tell(n, f"signal {sig}\n")
        failed = [n for n in nodes if n.proc.poll() not in (None, 0, REQUEUE_EXIT_CODE)]
        if failed and preempted is not None:
            return Outcome(128 + preempted, f"stopped every node on {signal_name(preempted)}", asked=True)
        if failed:
            return _failure(nodes, failed[0], readers)
        codes = [n.proc.returncode for n in nodes]
        if all(c == 0 for c in codes):
            return Outcome(0)
        if all(c in (0, REQUEUE_EXIT_CODE) for c in codes):
            return _checkpointed()
        time.sleep(POLL_SECONDS)


def _checkpointed() -> Outcome:
    return Outcome(
        REQUEUE_EXIT_CODE,
        f"every rank saved a checkpoint and stopped: rerun with resume=auto to continue (exit {REQUEUE_EXIT_CODE})",
    )


def _failure(nodes: list[Node], first: Node, readers: list[threading.Thread]) -> Outcome:
    """The failure to report once the other nodes had a moment to end on their own: a rank killed by a signal
    before ranks that exited (they failed because it died), else the first node seen failing."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while any(n.proc.poll() is None for n in nodes) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    for n, t in zip(nodes, readers, strict=True):
        if n.proc.returncode is not None:
            t.join(timeout=2.0)  # its result line read
    failed = [n for n in nodes if n.proc.returncode not in (None, 0)]
    chosen = next((n for n in failed if n.killed_rank), first)
    r = chosen.result or {}
    code = shell_code(r["code"]) if r.get("code") is not None else shell_code(chosen.proc.returncode)
    return Outcome(code, chosen.describe() + _others(nodes, chosen))


def _others(nodes: list[Node], chosen: Node) -> str:
    stopped = [n.host for n in nodes if n is not chosen and n.proc.returncode is None]
    return f"; stopping {', '.join(stopped)}" if stopped else ""


def _tell(node: Node, text: str) -> None:
    try:
        node.proc.stdin.write(text)  # type: ignore[union-attr]
        node.proc.stdin.flush()  # type: ignore[union-attr]
    except (BrokenPipeError, OSError, ValueError):
        pass


def _stop(nodes: list[Node]) -> None:
    """Close every live node's stdin (its node side stops all its processes and exits), then kill any ssh still
    there after STOP_SECONDS; reap them all."""
    alive = [n for n in nodes if n.proc.poll() is None]
    for n in nodes:
        try:
            n.proc.stdin.close()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + STOP_SECONDS
    for n in alive:
        try:
            n.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(
                f"launcher: node {n.host} still running {STOP_SECONDS:g} s after being asked to stop; killing its ssh",
                file=sys.stderr,
                flush=True,
            )
            n.proc.kill()
            n.proc.wait()


PDSH_FAILED = re.compile(r"^pdsh@\S+: (?P<host>\S+): ssh exited with exit code (?P<code>\d+)")
PDSH_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.-]+): (?P<text>.*)$", re.DOTALL)
SWEEP_SECONDS = 5.0
"""After DeepSpeed's runner stopped, how long its ranks have to end on SIGTERM before the sweep sends SIGKILL."""


def run_runner(launch, cluster, plan_path: str) -> int:
    """DeepSpeed's runner (over pdsh) or srun: one local process starts every node. Its output is streamed with
    `[host]` prefixes and the values of secret names shown as *** (DeepSpeed's runner logs the nodes' command, exports
    and all); the exit code is the failing node's, read from pdsh's own report when DeepSpeed's runner
    exits 0 (it does when pdsh is killed by a signal) or names no rank; and after any failure every host is swept
    of the run's processes (pkill over pdsh), so none is left."""
    from launcher.files import write_atomic
    from launcher.launch.commands import SECRET

    runner, hosts, ssh_config = cluster.runner, [h.name for h in cluster.hosts], cluster.ssh_config
    secrets = [v for k, v in cluster.env.items() if SECRET.search(k) and v]
    (command,) = launch.commands
    if launch.env_file is not None:
        env_path = launch.environ["DS_ENV_FILE"]
        write_atomic(env_path, launch.env_file)
        os.chmod(env_path, 0o600)  # it holds the forwarded secrets
    print(f"launcher: starting {runner}: {command.shown}", file=sys.stderr, flush=True)
    env = launch.environ if launch.environ is not None else dict(os.environ)
    failures: list[tuple[str, int]] = []
    with NotedSignals(STOP_SIGNALS, keep_ignored=(signal.SIGHUP,)) as signals:
        proc = subprocess.Popen(
            command.argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=_die_with_launcher(),
        )
        reader = threading.Thread(target=_read_runner, args=(proc, failures, secrets), daemon=True)
        reader.start()
        asked = None
        while proc.poll() is None:
            sig = signals.received
            if sig and asked is None:
                asked = sig
                proc.send_signal(signal.SIGTERM if sig not in PREEMPT_SIGNALS else sig)
            if failures and asked is None:
                time.sleep(SETTLE_SECONDS)  # the other nodes' ranks may end on their own
                asked = -1
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # DeepSpeed's runner then pkills its launch on every node
            time.sleep(POLL_SECONDS)
        reader.join(timeout=2.0)
    code = proc.returncode
    finished = os.path.exists(os.path.join(os.path.dirname(plan_path), "summary.json"))
    if runner == "deepspeed" and (failures or code or not finished):
        _sweep(hosts, plan_path, ssh_config)
    if code == REQUEUE_EXIT_CODE:
        return _report(_checkpointed())
    if asked and asked > 0:
        return _report(Outcome(128 + asked, f"stopped every node on {signal_name(asked)}", asked=True))
    if failures:
        host, node_code = failures[0]
        rank_code = _deepspeed_code(node_code)
        how = f"was killed by {signal_name(-rank_code)}" if rank_code < 0 else f"exited with code {rank_code}"
        return _report(
            Outcome(shell_code(rank_code), f"a rank on {host} {how} (its node's launcher exited with {node_code})")
        )
    if code == 0 and not finished and runner == "deepspeed":
        return _report(
            Outcome(1, "DeepSpeed's runner exited 0, but the run did not finish (no summary.json): pdsh ended early")
        )
    if code:
        return _report(Outcome(shell_code(code), f"{runner} ({command.argv[0]}) ended with {code}"))
    return 0


def _read_runner(proc: subprocess.Popen, failures: list[tuple[str, int]], secrets: list[str]) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        for value in secrets:
            line = line.replace(value, "***")
        failed = PDSH_FAILED.match(line)
        if failed:
            failures.append((failed.group("host"), int(failed.group("code"))))
        pdsh = PDSH_LINE.match(line)
        if pdsh and not failed:  # a rank's own line comes prefixed [host:rank] (worker.prefix): pdsh's is dropped
            host, text = pdsh.group("host", "text")
            line = text if text.startswith(f"[{host}:") else f"[{host}] {text}"
        sys.stdout.write(line)
        sys.stdout.flush()


def _deepspeed_code(node_code: int) -> int:
    """A rank's code from its node's: DeepSpeed's launch exits with the rank's return code, a negative one (killed
    by signal N) reaching the shell as 256 - N."""
    return node_code - 256 if node_code > 192 else node_code


def _sweep(hosts: list[str], plan_path: str, ssh_config: str | None) -> None:
    """Stop whatever of the run is left on every host: its ranks and DeepSpeed's launch all have `--plan PLAN` on
    their command line. The pattern's `[-]` keeps it from matching itself (nor the ssh carrying it)."""
    pattern = "[-]-plan " + re.escape(plan_path)
    env = {**os.environ, "PDSH_RCMD_TYPE": "ssh"}
    if ssh_config:
        env["PDSH_SSH_ARGS_APPEND"] = f"-F {ssh_config}"
    for sig, wait in (("TERM", SWEEP_SECONDS), ("KILL", 0.0)):
        subprocess.run(
            ["pdsh", "-w", ",".join(hosts), f"pkill -{sig} -f {shlex.quote(pattern)}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(wait)


REACH_SECONDS = 15
"""How long ssh waits for each host to answer (ConnectTimeout)."""
PROBE_SECONDS = 120
"""How long a host's probe may take (it imports torch)."""
ALLREDUCE_SECONDS = 180
"""How long the all-reduce across the hosts may take, rendezvous included."""


def on_each(
    hosts: list[str], remote: str, ssh_config: str | None, ssh_port: int | None, timeout: float
) -> dict[str, subprocess.CompletedProcess | str]:
    """`remote` (a shell line) run on every host at once over ssh: host -> the finished ssh, or what went wrong
    (a string: ssh's own last words when it could not run the command)."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(host: str) -> subprocess.CompletedProcess | str:
        argv = [
            "ssh", *(["-F", ssh_config] if ssh_config else []), "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={REACH_SECONDS}", *(["-p", str(ssh_port)] if ssh_port else []), host, remote,
        ]  # fmt: skip
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"no answer within {timeout:g} s"
        if out.returncode == SSH_FAILED:
            lines = out.stderr.strip().splitlines()
            return lines[-1] if lines else f"ssh exited with {SSH_FAILED}"
        return out

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return dict(zip(hosts, pool.map(attempt, hosts), strict=True))


def check_cluster(cluster, output_dir: str) -> tuple[dict[str, dict | str], dict | str | None]:
    """Each host's probe (launch/probe.py, in this directory with this Python, as a run would be), then, when
    every host answered, an all-reduce across them (one process per host, launch/allreduce.py): (host -> its
    report or what went wrong, the all-reduce's result or what went wrong; None when it was not tried)."""
    from launcher.hostfile import Host
    from launcher.launch import nodes
    from launcher.launch.allreduce import ALLREDUCE_MARK
    from launcher.launch.probe import PROBE_MARK

    hosts = [h.name for h in cluster.hosts]
    line = f"cd {shlex.quote(os.getcwd())} && exec {shlex.quote(sys.executable)} -m launcher.launch.probe "
    answers = on_each(hosts, line + shlex.quote(output_dir), cluster.ssh_config, cluster.ssh_port, PROBE_SECONDS)
    reports: dict[str, dict | str] = {}
    for host, answer in answers.items():
        if isinstance(answer, str):
            reports[host] = answer if answer.startswith("ssh:") else f"ssh: {answer}"
            continue
        found = [x for x in answer.stdout.splitlines() if x.startswith(PROBE_MARK)]
        said = (answer.stderr.strip().splitlines() or [f"exit {answer.returncode}"])[-1]
        reports[host] = json.loads(found[-1][len(PROBE_MARK) :]) if found else f"the probe failed there: {said}"
    if not all(isinstance(r, dict) for r in reports.values()):
        return reports, None
    one_each = [Host(h.name, (h.slots[0],)) for h in cluster.hosts]
    commands = nodes.ssh_commands(
        one_each, recipe="", plan_path="", cwd=os.getcwd(), python=sys.executable, rdzv_port=cluster.master_port,
        run_id=f"check-{os.getpid()}", env={**cluster.env, "PYTHONUNBUFFERED": "1"}, log_dir=None,
        ssh_port=cluster.ssh_port, ssh_config=cluster.ssh_config, program=["-m", "launcher.launch.allreduce"],
    )  # fmt: skip
    lines: list[str] = []
    code = run_nodes(commands, capture=lines, timeout=ALLREDUCE_SECONDS)
    found = [x.split(ALLREDUCE_MARK, 1)[1] for x in lines if ALLREDUCE_MARK in x]
    if code == 0 and found:
        return reports, json.loads(found[-1])
    return reports, f"the all-reduce failed (exit {code}): {''.join(lines[-3:]).strip()}"

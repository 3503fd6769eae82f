"""How a job ends: signals to the launcher stop every rank (a preemption signal to a training job checkpoints it
first, exit 75), a launcher killed outright takes its ranks along, and a rank that dies is named. Each check finds
the ranks by pid and asserts that none is left running.

Most checks drive `run_local` from a small script (so the test can signal that process) with ranks that only write
their pid and sleep; one runs the real `launcher run` on a tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launcher.checkpoints import complete
from tests.conftest import BIN, LONG, RECIPE, ROOT, last_loss, tiny_args, why_failed

LINUX = sys.platform.startswith("linux")

# A rank: announce its pid (atomically, so a reader never sees half of it), optionally ignore SIGTERM, sleep.
RANK = """
import os, signal, sys, time
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""

GRACE = 1.0
"""The seconds the driver's launcher gives a rank between SIGTERM and SIGKILL."""

# The launcher's spawner in a process of its own: driver.py OUT_DIR BEHAVIOUR... (one rank per behaviour).
DRIVER = """
import sys
from launcher.launch import execute
from launcher.launch.commands import RankCommand

execute.GRACE_SECONDS = GRACE
out, behaviours = sys.argv[1], sys.argv[2:]
rank_code = open(out + "/rank.py").read()
commands = [
    RankCommand(rank=r, argv=[sys.executable, "-c", rank_code, f"{out}/rank{r}.pid", b])
    for r, b in enumerate(behaviours)
]
sys.exit(execute.run_local(commands))
"""


@pytest.fixture
def leftovers():
    """Pids a test expects gone; any still running at teardown is SIGKILLed, so a failing test leaves nothing."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # An orphan that died is a zombie until init reaps it (a container's init may never do so); it runs nothing.
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def assert_gone(pids: list[int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [p for p in pids if _running(p)]
    assert not survivors, f"ranks still running {within:g} s after the launcher ended: pids {survivors}"


def start_driver(tmp_path: Path, leftovers: list[int], *behaviours: str, ignore: signal.Signals | None = None):
    """The driver with one rank per behaviour ("sleep" or "ignore-term"), once every rank is running; returns
    (driver process, rank pids, its output file)."""
    (tmp_path / "rank.py").write_text(RANK)
    (tmp_path / "driver.py").write_text(DRIVER.replace("= GRACE", f"= {GRACE}"))
    # Output goes to a file, not a pipe: a rank left behind would hold a pipe open and stall the reader.
    log = tmp_path / "launcher.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "driver.py"), str(tmp_path), *behaviours],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            # The launcher inherits `ignore` ignored: SIGINT as bash does to `cmd &` in a script, SIGHUP as nohup.
            preexec_fn=lambda: _dispositions(ignore),
        )
    files = [tmp_path / f"rank{r}.pid" for r in range(len(behaviours))]
    deadline = time.monotonic() + 30
    while not all(f.exists() for f in files):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the ranks did not start:\n{log.read_text()}")
        time.sleep(0.02)
    pids = [int(f.read_text()) for f in files]
    leftovers.extend(pids)
    return proc, pids, log


def _dispositions(ignore: signal.Signals | None) -> None:
    """In the driver before exec: SIGHUP at its default whatever this run inherited (under nohup pytest ignores
    it, and the launcher keeps an inherited ignored SIGHUP ignored), then `ignore` ignored."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if ignore:
        signal.signal(ignore, signal.SIG_IGN)


def finish(proc: subprocess.Popen, log: Path, after: str, timeout: float = 30) -> tuple[int, str]:
    """The launcher's exit code and output once it ends; a launcher still running is killed and the test fails."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the launcher was still running {timeout:g} s after {after}:\n{log.read_text()}")
    return proc.returncode, log.read_text()


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_launcher_stops_every_rank(tmp_path, leftovers, sig):
    proc, pids, log = start_driver(tmp_path, leftovers, "sleep", "sleep")
    proc.send_signal(sig)
    code, output = finish(proc, log, sig.name)
    assert_gone(pids)
    assert code == 128 + sig, output
    assert last_line(output) == f"launcher: stopped every rank on {sig.name}"


def test_a_rank_ignoring_sigterm_gets_sigkill_after_the_grace_period(tmp_path, leftovers):
    proc, pids, log = start_driver(tmp_path, leftovers, "sleep", "ignore-term")
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc, log, "SIGTERM")
    assert_gone(pids)
    assert code == 143, output
    assert f"rank 1 (pid {pids[1]}) still running 1 s after SIGTERM; sending SIGKILL" in output


def test_sigint_stops_a_launcher_that_inherited_it_ignored(tmp_path, leftovers):
    proc, pids, log = start_driver(tmp_path, leftovers, "sleep", "sleep", ignore=signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    code, output = finish(proc, log, "SIGINT", timeout=10)
    assert_gone(pids)
    assert code == 130, output
    assert last_line(output) == "launcher: stopped every rank on SIGINT"


def test_nohup_still_outlives_the_terminal(tmp_path, leftovers):
    proc, pids, log = start_driver(tmp_path, leftovers, "sleep", "sleep", ignore=signal.SIGHUP)
    proc.send_signal(signal.SIGHUP)
    # Watched past the time a launcher that took SIGHUP would need to stop its ranks (SIGTERM, then SIGKILL after
    # the grace period): the SIGHUP case above stops within it.
    deadline = time.monotonic() + 3 * GRACE
    while time.monotonic() < deadline:
        assert proc.poll() is None and all(_running(p) for p in pids), f"stopped on SIGHUP:\n{log.read_text()}"
        time.sleep(0.05)
    assert "SIGHUP" not in log.read_text()
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc, log, "SIGTERM")
    assert_gone(pids)
    assert code == 143, output


@pytest.mark.skipif(not LINUX, reason="ranks follow a SIGKILLed launcher through Linux's PR_SET_PDEATHSIG")
def test_ranks_die_with_a_sigkilled_launcher(tmp_path, leftovers):
    proc, pids, _ = start_driver(tmp_path, leftovers, "sleep", "sleep")
    proc.kill()
    proc.wait()
    assert_gone(pids)


def test_a_rank_killed_by_a_signal_is_named_with_its_pid_and_the_exit_code_follows(tmp_path, leftovers):
    proc, pids, log = start_driver(tmp_path, leftovers, "sleep", "sleep")
    os.kill(pids[1], signal.SIGKILL)
    code, output = finish(proc, log, "rank 1 was killed")
    assert_gone(pids)
    assert last_line(output) == f"launcher: rank 1 (pid {pids[1]}) was killed by SIGKILL", output
    assert code == 137


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the fourth field of /proc/PID/stat)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # it ended while we looked
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.skipif(not LINUX, reason="finds the ranks through /proc")
@pytest.mark.parametrize("to", ["SIGTERM to the launcher", "SIGUSR1 to the ranks"])
def test_a_preempted_run_checkpoints_exits_75_and_resumes_to_the_same_end(
    ranks2, tiny_model, tiny_data, tmp_path, leftovers, uninterrupted, to
):
    """A preemption (the launcher signalled, or every rank as Slurm does): each rank finishes its step, they agree,
    a checkpoint is written and the job exits with the requeue code; resume=auto then ends as a run never stopped."""
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    argv = ["launcher", "run", RECIPE, "--nproc", "2", *tiny_args(tiny_model, tiny_data, out, *LONG)]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    with log.open("w") as sink:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):  # a line per step: training has begun
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training never started:\n{log.read_text()}")
        time.sleep(0.1)
    ranks = _children(proc.pid)
    leftovers.extend(ranks)
    assert len(ranks) == 2, ranks
    if to.endswith("launcher"):
        proc.send_signal(signal.SIGTERM)
    else:
        for pid in ranks:
            os.kill(pid, signal.SIGUSR1)
    code, output = finish(proc, log, to)
    assert_gone(ranks)
    assert code == 75, output
    assert "rerun with resume=auto to continue (exit 75)" in last_line(output), output
    found = complete(str(out))
    assert len(found) == 1 and 0 < found[0][0] < 300, found
    step = found[0][0]
    assert f"after step {step} of 300: checkpoint {found[0][1]} written" in output
    again = ranks2.run(RECIPE, tiny_args(tiny_model, tiny_data, out, *LONG, "resume=auto"), cwd=tmp_path)
    assert again.returncode == 0, why_failed(again)
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == found[0][1]
    assert last_loss(out) == pytest.approx(last_loss(uninterrupted), abs=1e-6)
    a = load_file(str(uninterrupted / "adapter/adapter_model.safetensors"))
    b = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_a_usage_error_on_one_rank_stops_the_others_without_stack_dumps(tmp_path, capsys):
    """Rank 0 refuses its settings (exit 2) while rank 1 waits for it: the job ends with exit 2 and the rank's own
    message, the waiting rank is stopped, and no stacks are asked for or shown."""
    from launcher.launch.commands import RankCommand
    from launcher.launch.execute import run_local

    refuse = "import sys; print('error: data.max_length=64: no row fits', file=sys.stderr); sys.exit(2)"
    wait = "import time; time.sleep(60)"
    started = time.monotonic()
    code = run_local([RankCommand(0, [sys.executable, "-c", refuse]), RankCommand(1, [sys.executable, "-c", wait])],
                     logs=str(tmp_path))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 30
    assert "stacks" not in err and not list(tmp_path.glob("stacks-rank-*")), err
    assert "rank 0" in err and "exited with code 2" in err, err

"""Reading a rank's own log for the launcher's failure summary."""

from __future__ import annotations

from launcher.ranklogs import Repeats, exception_of, failure_summary, header, log_path, read_header

TRACE = """\
step 1/8  loss 0.6931
Traceback (most recent call last):
  File "x.py", line 3, in <module>
    f()
ValueError: first
During handling of the above exception, another exception occurred:
Traceback (most recent call last):
  File "x.py", line 5, in <module>
    g()
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
""".splitlines()


def test_the_exception_is_the_last_tracebacks_closing_line_with_or_without_host_prefixes():
    assert exception_of(TRACE) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert exception_of([f"[node-2:3] {line}" for line in TRACE]).startswith("torch.OutOfMemoryError: CUDA out")
    assert exception_of([f"[rank3]: {line}" for line in TRACE]).startswith("torch.OutOfMemoryError: CUDA out")
    assert exception_of(["loading", "Fatal Python error: Aborted", "", "Current thread 0x1 (most recent call first):"])
    assert exception_of(["step 1/8", "all is well"]) is None


def test_a_failed_ranks_summary_says_its_host_exception_and_last_lines(tmp_path):
    path = log_path(str(tmp_path), 1)
    with open(path, "w") as f:
        f.write(header(1, 2, "node-2", 4242, "2026-12-03T12:00:00+0000", False) + "\n" + "\n".join(TRACE) + "\n")
    assert read_header(open(path).readline()) == {"rank": 1, "world_size": 2, "host": "node-2", "pid": 4242}
    summary = failure_summary(str(tmp_path), 1, pid=4242, tail=3)
    assert summary[0] == (
        "rank 1 on node-2 (pid 4242) failed first: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
        "2.00 GiB"
    )
    assert summary[1] == f"its last lines ({path}):" and len(summary) == 2 + 3 and summary[-1].startswith("  | torch.")
    assert failure_summary(str(tmp_path), 1, pid=999) == []  # an earlier run's log
    assert failure_summary(str(tmp_path), 0) == []  # none written


def test_a_warning_the_ranks_repeat_is_shown_once_and_counted():
    repeats = Repeats()
    warning = "UserWarning: torch.utils.checkpoint: the use_reentrant parameter should be passed explicitly\n"
    shown = [repeats.first(rank, line) for rank in (1, 2, 3) for line in (warning, f"rank {rank} at step 1\n")]
    assert shown == [True, True, False, True, False, True]  # every rank's own lines, the warning once
    assert repeats.first(1, "[2026-12-03] [WARNING] [comm.py:12] backend gloo\n")  # a different one: shown
    assert repeats.summary() == ["3 ranks printed this warning 3 times, shown once: " + warning.strip()]


RANK_LOSING_ITS_COPIER = """
import os, signal, sys, time
from launcher.worker import ranklog

ranklog.start(sys.argv[1], 0, 1)
print("before", flush=True)
os.kill(ranklog._tee.copier.pid, signal.SIGKILL)
time.sleep(0.5)
for i in range(3000):  # far more than a pipe holds: nobody reading would block or break the rank
    print(f"after {i} " + "x" * 60, flush=True)
print("done", file=sys.stderr, flush=True)
"""


def test_a_rank_whose_log_copier_is_killed_goes_on_and_keeps_its_log(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", RANK_LOSING_ITS_COPIER, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert out[0] == "before" and out[-1].startswith("after 2999 ") and len(out) == 3001
    assert "log copier (pid" in proc.stderr and "was killed by signal 9; a new one copies from here" in proc.stderr
    assert "done" in proc.stderr
    log = (tmp_path / "rank0.log").read_text()
    assert "before" in log and "after 2999 " in log and "done" in log and "log copier (pid" in log

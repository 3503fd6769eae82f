"""A rank that dies or hangs mid-run (tests/helpers/faulty_cls.py injects the fault): the job stops in seconds,
names the rank, leaves every rank's stacks in output_dir/logs and no process behind; its checkpoints resume; and
`launcher run --max-restarts` (or torchrun's) starts it again to the same final weights as a run that never failed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.launch.oom import oom_kills
from launcher.worker import checkpoint as checkpoint_io
from tests.conftest import BIN, ROOT, run, tiny_args, why_failed

FAULTY = str(ROOT / "tests" / "helpers" / "faulty_cls.py")
# 8 steps of 16 examples (96 rows: an epoch boundary after step 6), a checkpoint every 2 steps.
STEPS = ["train.max_steps=8", "checkpoint.every_steps=2", "train.eval_every=0"]


def launch(
    argv: list[str], tmp_path: Path, fault: str = "", env: dict | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = run(argv, cwd=tmp_path, timeout=240, env={**(env or {}), **({"FAULT": fault} if fault else {})})
    return proc, time.monotonic() - t0


def settings(tiny_model, tiny_data, out: Path, *extra: str) -> list[str]:
    """The tiny run's settings, STEPS and `extra` (which replace a STEPS setting of the same key)."""
    given = {e.split("=", 1)[0] for e in extra}
    return tiny_args(tiny_model, tiny_data, out, *[s for s in STEPS if s.split("=", 1)[0] not in given], *extra)


@pytest.fixture(scope="module")
def whole(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """The run no fault interrupts."""
    out = tmp_path_factory.mktemp("whole") / "run"
    proc, _ = launch(["launcher", "run", FAULTY, "--nproc", "2", *settings(tiny_model, tiny_data, out)], out.parent)
    assert proc.returncode == 0, why_failed(proc)
    return out


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def assert_same_end(out: Path, whole: Path) -> None:
    """Each step logged once, with the uninterrupted run's loss, and the same trained weights."""
    ours, theirs = train_rows(out), train_rows(whole)
    assert [r["step"] for r in ours] == list(range(1, 9)), [r["step"] for r in ours]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs)) <= 1e-6
    a = load_file(str(whole / "adapter/adapter_model.safetensors"))
    b = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def left_running(out: Path) -> list[int]:
    """Processes whose command line names this run (its plan file, or its output_dir): none may outlive it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if str(out) in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds leftover processes through /proc")
def test_a_rank_that_raises_is_summed_up_from_its_own_log(tiny_model, tiny_data, tmp_path):
    """Every rank writes output_dir/logs/rankR.log (its host in the header); rank 1 raises in step 3, and the
    launcher's failure summary names rank 1, its host and the exception, and shows the log's last lines."""
    out = tmp_path / "run"
    argv = ["launcher", "run", FAULTY, "--nproc", "2", *settings(tiny_model, tiny_data, out)]
    proc, _ = launch(argv, tmp_path, "raise:1:3")
    assert proc.returncode == 1, why_failed(proc)
    said = [line.removeprefix("launcher: ") for line in proc.stderr.splitlines() if line.startswith("launcher: ")]
    host = socket.gethostname()
    first = next(line for line in said if " failed first" in line)
    assert first.startswith(f"rank 1 on {host} (pid ") and first.endswith(
        "failed first: RuntimeError: injected fault in step 3"
    ), said
    log = out / "logs" / "rank1.log"
    at = said.index(f"its last lines ({log}):")
    shown = [line for line in said[at + 1 :] if line.startswith("  | ")]
    assert len(shown) == 12 and said[at + 1 : at + 13] == shown, said
    assert shown[-1].endswith("RuntimeError: injected fault in step 3"), said
    assert said[-1].startswith("rank 1 (pid ") and said[-1].endswith("exited with code 1"), said
    text = log.read_text()
    assert text.startswith(f"# launcher rank log: rank 1 of 2 on {host}, pid ") and "Traceback" in text
    assert "rank 1 is about to fail" in text  # what the rank printed itself, before the traceback
    rank0 = (out / "logs" / "rank0.log").read_text()
    assert rank0.startswith(f"# launcher rank log: rank 0 of 2 on {host}") and "step 2/8" in rank0


def test_a_rank_killed_mid_run_is_named_and_leaves_its_checkpoints_complete(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    fault = f"die-once:1:5:{tmp_path / 'died'}"  # rank 1 is SIGKILLed in step 5, after the checkpoint of step 4
    proc, seconds = launch(
        ["launcher", "run", FAULTY, "--nproc", "2", *settings(tiny_model, tiny_data, out)], tmp_path, fault
    )
    assert proc.returncode == 137, why_failed(proc)
    assert seconds < 60, seconds
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("launcher: rank 1 (pid ") and last.endswith(") was killed by SIGKILL"), proc.stderr[-3000:]
    if oom_kills() is not None:  # the memory cgroup's count says the OOM killer was not it
        assert "was not ended by the kernel's OOM killer (none counted): something sent it SIGKILL" in proc.stderr
    assert left_running(out) == []
    # Its checkpoints stay complete: the restart tests below resume from such a death, to the same end.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not checkpoint_io.damage(str(out / "checkpoints" / "step-00000004"))


def test_max_restarts_starts_every_rank_again_and_ends_as_a_run_that_never_failed(
    tiny_model, tiny_data, tmp_path, whole
):
    """Restarted twice: rank 1 dies in step 5 (restart from step 4), then rank 0 in step 7 (from step 6)."""
    out = tmp_path / "run"
    fault = f"die-once:1:5:{tmp_path / 'died-1'},die-once:0:7:{tmp_path / 'died-0'}"
    argv = ["launcher", "run", FAULTY, "--nproc", "2", "--max-restarts", "2", *settings(tiny_model, tiny_data, out)]
    proc, _ = launch(argv, tmp_path, fault)
    assert proc.returncode == 0, why_failed(proc)
    assert (tmp_path / "died-1").exists() and (tmp_path / "died-0").exists(), "a fault was never injected"
    for restart, rank in ((1, 1), (2, 0)):
        said = f"launcher: rank {rank} (pid "
        lines = [x for x in proc.stderr.splitlines() if x.startswith(said) and f"(restart {restart} of 2)" in x]
        assert (
            len(lines) == 1
            and "was killed by SIGKILL; starting every rank again from the newest checkpoint" in lines[0]
        )
    shown = " ".join(proc.stdout.split())
    assert "restart 2: resuming from the newest complete checkpoint (resume=auto)" in shown
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    restarts = [(r["restart"], r["step"]) for r in rows if r["split"] == "restart"]
    assert restarts == [(1, 4), (2, 6)], restarts
    assert all("killed by SIGKILL" in r["after"] for r in rows if r["split"] == "restart")
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step-00000006")
    assert_same_end(out, whole)


def test_torchrun_max_restarts_resumes_the_recipe_from_its_newest_checkpoint(tiny_model, tiny_data, tmp_path, whole):
    """The direct form: torchrun's elastic agent starts the ranks again (TORCHELASTIC_RESTART_COUNT=1), and the
    recipe resumes on its own."""
    out = tmp_path / "run"
    fault = f"die-once:1:5:{tmp_path / 'died'}"
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    argv = [*torchrun, FAULTY, *settings(tiny_model, tiny_data, out)]
    told = "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun"
    proc, _ = launch(argv, tmp_path, fault, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert proc.returncode == 0, why_failed(proc)
    assert told not in " ".join(proc.stdout.split()), "the note is for a torchrun that shares its store"
    assert (tmp_path / "died").exists(), "the fault was never injected"
    assert_same_end(out, whole)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds leftover processes through /proc")
def test_a_rank_stuck_in_a_collective_is_named_and_every_stalled_rank_writes_its_stacks(
    tiny_model, tiny_data, tmp_path
):
    out, timeout = tmp_path / "run", 8
    argv = [
        "launcher", "run", FAULTY, "--nproc", "2",
        *settings(tiny_model, tiny_data, out, f"watchdog.timeout={timeout}", "train.max_steps=50"),
    ]  # fmt: skip
    proc, seconds = launch(argv, tmp_path, "hang:1:3")  # rank 1 sleeps in step 3's all-reduce
    assert proc.returncode == 124, why_failed(proc)
    assert seconds < timeout + 30 + 15, seconds  # + the start of the run (about 10 s here)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("launcher: rank 1 (pid "), proc.stderr[-3000:]
    assert f"(training, after step 2): stuck at {FAULTY}:" in last and "in all_reduce" in last, last
    assert "rank 0 waits for it in a collective" in last, last
    assert left_running(out) == []
    logs = out / "logs"
    stuck, waiting = (logs / "stacks-rank-1.txt").read_text(), (logs / "stacks-rank-0.txt").read_text()
    assert "faulty_cls.py" in stuck and "in all_reduce" in stuck, stuck
    assert "distributed_c10d.py" in waiting and "loop.py" in waiting, waiting
    reports = {r: json.loads((logs / f"hang-rank-{r}.json").read_text()) for r in (0, 1)}
    assert [reports[0]["waiting"], reports[1]["waiting"]] == [True, False], reports
    assert reports[0]["step"] == reports[1]["step"] == 2 and reports[1]["seconds"] >= timeout


def test_a_save_killed_halfway_leaves_the_previous_checkpoint_the_one_resume_auto_takes(
    tiny_model, tiny_data, tmp_path, whole
):
    out = tmp_path / "run"
    fault = f"die-saving:0:4:{tmp_path / 'died'}"  # rank 0 dies writing step 4's checkpoint, before its manifest
    proc, _ = launch(
        ["launcher", "run", FAULTY, "--nproc", "2", *settings(tiny_model, tiny_data, out)], tmp_path, fault
    )
    assert proc.returncode == 137, why_failed(proc)
    assert proc.stderr.strip().splitlines()[-1].endswith(") was killed by SIGKILL"), proc.stderr[-2000:]
    half = out / "checkpoints" / "step-00000004.tmp"
    assert sorted(p.name for p in half.iterdir()) == [
        "recipe.py", "state.pt", "trained-00001-of-00001.safetensors", "trained.safetensors.index.json",
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004.tmp"]
    again, _ = launch(
        ["launcher", "run", FAULTY, "--nproc", "2", *settings(tiny_model, tiny_data, out, "resume=auto")], tmp_path
    )
    assert again.returncode == 0, why_failed(again)
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step-00000002")
    assert not half.exists(), "the next complete save cleans up the half-written one"
    assert_same_end(out, whole)


OUT_OF_MEMORY = """
import os, sys
from launcher.launch.commands import RankCommand
from launcher.launch.execute import run_local

open(os.path.join(sys.argv[1], "cgroup.procs"), "w").write(str(os.getpid()))  # the ranks start in it too
hungry = "x = bytearray(1 << 30)"  # zero-filled: every page touched, over the limit
idle = "import time; time.sleep(60)"
sys.exit(run_local([RankCommand(0, [sys.executable, "-c", idle]), RankCommand(1, [sys.executable, "-c", hungry])]))
"""


def _memory_cgroup_below_ours(name: str) -> tuple[Path, str] | None:
    """A new memory cgroup under this process's own, and the file that limits it; None where none can be made."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder, limit = Path("/sys/fs/cgroup") / path.lstrip("/") / name, "memory.max"
        elif "memory" in controllers.split(","):
            folder, limit = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / name, "memory.limit_in_bytes"
        else:
            continue
        try:
            folder.mkdir()
            (folder / limit).write_text(str(300 * 2**20))
        except OSError:
            continue
        return folder, limit
    return None


def test_a_rank_the_kernels_oom_killer_ends_is_said_to_have_run_out_of_memory(tmp_path):
    """A real out-of-memory kill: the launcher and its ranks in a memory cgroup of 300 MiB, rank 1 filling 1 GiB."""
    made = _memory_cgroup_below_ours(f"launcher-oom-{os.getpid()}")
    if made is None:
        pytest.skip("no memory cgroup can be made here (not root, or cgroups read-only)")
    folder, _ = made
    try:
        proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, str(folder)], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    finally:
        folder.rmdir()
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert "launcher: the kernel's OOM killer ended pid" in proc.stderr, proc.stderr[-3000:]
    assert "it ran out of memory: lower train.micro_batch_size or data.max_length" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("was killed by SIGKILL")


def test_a_preemption_during_the_final_evaluation_exits_75_and_resumes_to_the_saved_model(
    ranks2, tiny_model, tiny_data, tmp_path, whole
):
    """SIGUSR1 to rank 0 while it evaluates after the last step (its checkpoint written): the run stops with the
    requeue code and the hint, no model half-saved; resume=auto evaluates and saves the model of the run that never
    stopped. Without checkpoints the run keeps its training instead: it goes on to save the model."""
    out = tmp_path / "run"
    fault = {"FAULT": f"stop-evaluating:0:8:{tmp_path / 'stopped'}"}
    proc = ranks2.run(FAULTY, settings(tiny_model, tiny_data, out), cwd=tmp_path, env=fault)
    assert proc.returncode == 75, why_failed(proc)
    said = (
        f"SIGUSR1 after training (step 8), before saving the model: checkpoint {out / 'checkpoints' / 'step-00000008'}"
    )
    assert said in proc.stderr and "rerun with resume=auto to continue (exit 75)" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    again = ranks2.run(FAULTY, settings(tiny_model, tiny_data, out, "resume=auto"), cwd=tmp_path)
    assert again.returncode == 0, why_failed(again)
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((out / "summary.json").read_text())["metrics"]
        == json.loads((whole / "summary.json").read_text())["metrics"]
    )
    bare = tmp_path / "bare"
    fault = {"FAULT": f"stop-evaluating:0:8:{tmp_path / 'stopped-bare'}"}
    proc = ranks2.run(
        FAULTY, settings(tiny_model, tiny_data, bare, "checkpoint.every_steps=0"), cwd=tmp_path, env=fault
    )
    assert proc.returncode == 0, why_failed(proc)
    assert "a stop signal after training, with no checkpoint to resume from" in proc.stderr
    assert (bare / "adapter" / "adapter_model.safetensors").stat().st_size > 1000

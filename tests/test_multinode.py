"""Multi-node launches on two real ssh "nodes" of this machine (127.0.0.1 and 127.0.0.2, a private sshd started
once per session by scripts/loopback_nodes.sh): `lora_cls` through the ssh runner (one torchrun per node) and
DeepSpeed's runner (pdsh), compared with a local run of 2 processes; a rank killed on the second node stops
everything, on both hosts."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, RECIPE, ROOT, run, tiny_args, why_failed

LOOPBACK = str(ROOT / "hostfiles" / "loopback-two-nodes.txt")
# lora_cls, each rank writing the digest of the HF_TOKEN it got (the secret below must reach the second node).
TOKEN_RECIPE = str(ROOT / "tests" / "helpers" / "token_cls.py")
SECRET = "hf_secret_for_the_test"
# One thread per rank (two "nodes" share two cores); a secret of a forwarded family, to be sent and never shown.
ENV = {"OMP_NUM_THREADS": "1", "HF_TOKEN": SECRET}
SETTINGS = ("train.max_steps=6",)
pytestmark = pytest.mark.long  # real sshd and pdsh (scripts/system_packages.sh)


def _nodes(runner: str, ssh_config: Path) -> list[str]:
    return ["--hostfile", LOOPBACK, "--runner", runner, "--ssh-config", str(ssh_config), "--env", "OMP_NUM_THREADS"]


@pytest.fixture(scope="module")
def runs(loopback_nodes, tiny_model, tiny_data, tmp_path_factory):
    """The same tiny run three ways: 2 local processes, and 2 nodes of 1 process through each runner."""
    out = {}
    for how in ("local", "ssh", "deepspeed"):
        folder = tmp_path_factory.mktemp("multinode") / how
        where = ["--nproc", "2"] if how == "local" else _nodes(how, loopback_nodes)
        argv = ["launcher", "run", TOKEN_RECIPE, *where, *tiny_args(tiny_model, tiny_data, folder, *SETTINGS)]
        out[how] = (run(argv, cwd=ROOT, env=ENV, timeout=300), folder)
    return out


def _metrics(folder: Path) -> tuple[list[float], dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and r.get("split", "train") == "train"]
    return losses, json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("runner", ["ssh", "deepspeed"])
def test_two_nodes_train_as_two_local_processes_do(runs, runner):
    proc, folder = runs[runner]
    assert proc.returncode == 0, why_failed(proc)
    local_losses, local_summary = _metrics(runs["local"][1])
    losses, summary = _metrics(folder)
    assert len(losses) == 6 and losses == pytest.approx(local_losses, abs=1e-5)
    assert summary["metrics"] == pytest.approx(local_summary["metrics"], abs=1e-6)
    plan = json.loads((folder / "config.json").read_text())
    assert (plan["world_size"], plan["local_world_size"], plan["nodes"]) == (2, 1, 2)
    assert plan["hosts"] == ["127.0.0.1", "127.0.0.2"]


def test_each_line_says_where_it_came_from(runs):
    ssh, _ = runs["ssh"]
    assert "[127.0.0.1:0] step 6/6" in ssh.stdout  # rank 0, on the first host (c10d numbers nodes by address)
    deepspeed, _ = runs["deepspeed"]
    assert "[127.0.0.1:0] step 6/6" in deepspeed.stdout  # the rank's own prefix (worker/prefix.py), pdsh's dropped
    lines = deepspeed.stdout.splitlines()
    assert any(line.startswith("[127.0.0.2] ") and "launch.py" in line for line in lines)  # DeepSpeed's, via pdsh


@pytest.mark.parametrize("runner", ["ssh", "deepspeed"])
def test_secrets_reach_the_nodes_and_are_never_shown(runs, runner):
    proc, folder = runs[runner]
    assert proc.returncode == 0, why_failed(proc)
    sent = hashlib.sha256(SECRET.encode()).hexdigest()
    got = {rank: (folder / f"hf_token-rank{rank}.sha256").read_text() for rank in (0, 1)}
    assert got == {0: sent, 1: sent}, "the secret must reach both nodes (rank 1 runs on 127.0.0.2)"
    assert SECRET not in proc.stdout + proc.stderr
    if runner == "ssh":
        started = [line for line in proc.stderr.splitlines() if line.startswith("launcher: starting 127.0.0.")]
        assert len(started) == 2  # the command each node was started with, as shown
        assert all("HF_TOKEN='***'" in shlex.split(line)[-1] for line in started)
    else:
        env_file = folder / "deepspeed_env"  # what DeepSpeed's runner sends: the value itself, readable by us only
        assert f"HF_TOKEN={SECRET}\n" in env_file.read_text()
        assert env_file.stat().st_mode & 0o777 == 0o600


def _run_processes(folder: Path) -> dict[int, str]:
    """Live processes of a run (any with its plan path on its command line), pid -> command line."""
    needle = str(folder / "config.json")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            out[int(name)] = cmdline
    return out


def _rank_pid(folder: Path, rank: int) -> int | None:
    """The training process of `rank` (the recipe itself, RANK=rank in its environment), once it runs."""
    for pid, cmdline in _run_processes(folder).items():
        if "torch.distributed.run" in cmdline or "launcher.launch" in cmdline or "deepspeed.launcher" in cmdline:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and not cmdline.startswith("ssh"):
            return pid
    return None


def _start(runner: str, ssh_config: Path, folder: Path, tiny_model, tiny_data) -> subprocess.Popen:
    """A long run through `runner` (training, both nodes in step, when this returns)."""
    argv = [
        str(BIN / "launcher"), "run", RECIPE, *_nodes(runner, ssh_config), "--no-check",
        *tiny_args(tiny_model, tiny_data, folder, "train.max_steps=5000", "train.log_every=1"),
    ]  # fmt: skip
    env = {**os.environ, **ENV}
    launcher = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        metrics = folder / "metrics.jsonl"
        if _rank_pid(folder, 1) and metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            return launcher
        time.sleep(0.2)
    launcher.kill()
    out, err = launcher.communicate()
    raise AssertionError(f"training never started on both nodes: {launcher.returncode}\n{err[-3000:]}")


def _ended(launcher: subprocess.Popen, folder: Path) -> tuple[str, float]:
    """(the launcher's stderr, seconds it took to exit); nothing of the run is left afterwards, whatever happens."""
    start = time.monotonic()
    try:
        _, err = launcher.communicate(timeout=60)
        return err, time.monotonic() - start
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        time.sleep(1.0)
        left = _run_processes(folder)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the run left behind: {left}"


@pytest.mark.parametrize("runner", ["ssh", "deepspeed"])
def test_a_rank_killed_on_the_second_node_stops_every_node(loopback_nodes, tiny_model, tiny_data, tmp_path, runner):
    folder = tmp_path / "run"
    launcher = _start(runner, loopback_nodes, folder, tiny_model, tiny_data)
    os.kill(_rank_pid(folder, 1), signal.SIGKILL)
    err, took = _ended(launcher, folder)
    last = err.strip().splitlines()[-1]
    assert launcher.returncode == 128 + signal.SIGKILL, f"{launcher.returncode}: {err[-3000:]}"
    assert "127.0.0.2" in last and "killed by SIGKILL" in last, last
    assert took < 60


def test_pdsh_killed_under_deepspeeds_runner_is_a_failure_not_its_exit_0(loopback_nodes, tiny_model, tiny_data,
                                                                         tmp_path):  # fmt: skip
    """DeepSpeed's runner exits 0 when pdsh dies by a signal (it exits only on a positive code); the launcher sees
    that the run did not finish, says so, exits 1 and sweeps both hosts."""
    folder = tmp_path / "run"
    launcher = _start("deepspeed", loopback_nodes, folder, tiny_model, tiny_data)
    pdsh = [p for p, cmd in _run_processes(folder).items() if cmd.startswith("pdsh ")]
    assert len(pdsh) == 1, _run_processes(folder)
    os.kill(pdsh[0], signal.SIGKILL)
    err, took = _ended(launcher, folder)
    assert launcher.returncode == 1, err[-3000:]
    assert "DeepSpeed's runner exited 0, but the run did not finish" in err.strip().splitlines()[-1]
    assert took < 60


def test_a_host_ssh_cannot_reach_is_named_before_anything_starts(loopback_nodes, tiny_model, tiny_data, tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.3 slots=1  # nothing listens there on the configured port\n")
    config = tmp_path / "ssh_config"
    text = loopback_nodes.read_text()
    config.write_text(text.replace("Host 127.0.0.1 127.0.0.2", "Host 127.0.0.1 127.0.0.2 127.0.0.3"))
    folder = tmp_path / "run"
    argv = ["launcher", "run", RECIPE, "--hostfile", str(hostfile), "--ssh-config", str(config),
            *tiny_args(tiny_model, tiny_data, folder)]  # fmt: skip
    proc = run(argv, cwd=ROOT, env=ENV, timeout=120)
    assert proc.returncode == 255, why_failed(proc)
    problems = proc.stderr.split("nothing was started:")[1]
    assert "127.0.0.3: ssh: connect to host 127.0.0.3" in problems and "127.0.0.1:" not in problems
    assert not folder.exists()  # nothing claimed, nothing written


def test_launcher_check_passes_on_the_two_nodes_and_names_a_closed_host(loopback_nodes, tmp_path):
    proc = run(["launcher", "check", "--hostfile", LOOPBACK, "--ssh-config", str(loopback_nodes)], cwd=ROOT, env=ENV)
    assert proc.returncode == 0, why_failed(proc)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│ 127.0.0.")]
    assert len(rows) == 2 and all(row.rstrip("│ ").endswith("ok") for row in rows), proc.stdout
    assert "all-reduce across 2 hosts (gloo): 32 MB in " in proc.stdout and "GB/s" in proc.stdout
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.3 slots=1\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        loopback_nodes.read_text().replace("Host 127.0.0.1 127.0.0.2", "Host 127.0.0.1 127.0.0.2 127.0.0.3")
    )
    closed = run(["launcher", "check", "--hostfile", str(hostfile), "--ssh-config", str(config)], cwd=ROOT, env=ENV)
    assert closed.returncode == 255, why_failed(closed)
    assert "127.0.0.3: ssh: connect to host 127.0.0.3" in closed.stderr and "Connection refused" in closed.stderr
    assert "all-reduce: not tried" in closed.stdout


def test_sigterm_to_the_launcher_checkpoints_every_node_and_exits_75(loopback_nodes, tiny_model, tiny_data, tmp_path):
    """A preemption of a multi-node run: SIGTERM to the launcher reaches every rank through the node side and
    torchrun; the ranks save one checkpoint and stop, and the launcher exits 75 (torchrun's own exit 1 after the
    signal is not taken for a failure)."""
    from launcher.checkpoints import complete

    folder = tmp_path / "run"
    launcher = _start("ssh", loopback_nodes, folder, tiny_model, tiny_data)
    launcher.send_signal(signal.SIGTERM)
    err, took = _ended(launcher, folder)
    assert launcher.returncode == 75, err[-3000:]
    assert "every rank saved a checkpoint and stopped" in err.strip().splitlines()[-1]
    found = complete(str(folder))
    assert len(found) == 1 and 0 < found[0][0] < 5000, found
    assert took < 60

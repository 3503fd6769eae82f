"""What each multi-node runner runs, built by pure functions: the exact argv, the environment sent, the
quoting of hostile values (run through a real shell, as ssh's remote side and DeepSpeed's pdsh line are), and
secrets masked in what is shown."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from launcher.errors import ConfigError
from launcher.hostfile import parse_hostfile, select
from launcher.launch.nodes import (
    deepspeed_command,
    deepspeed_env_file,
    deepspeed_runner_environ,
    forwarded_env,
    parse_env_file,
    srun_command,
    ssh_commands,
)
from tests.conftest import ROOT

HOSTS = parse_hostfile("node-1 slots=2\nnode-2 slots=2\n")
HOSTILE = "$(touch {marker}); `touch {marker}`; 'quoted' \"double\" \\ end"


def test_the_ssh_runner_starts_one_torchrun_per_node_with_rendezvous_on_the_first():
    commands = ssh_commands(
        HOSTS,
        recipe="/work/recipes/lora_cls.py",
        plan_path="/runs/a/plan.json",
        cwd="/work",
        python="/venv/bin/python",
        rdzv_port=29500,
        run_id="run-a",
        env={"HF_HUB_OFFLINE": "1"},
        log_dir="/runs/a/logs/torchrun",
        ssh_port=2222,
        ssh_config="/keys/ssh_config",
    )
    assert [c.host for c in commands] == ["node-1", "node-2"]
    for rank, c in enumerate(commands):
        host = f"node-{rank + 1}"
        assert c.argv[:8] == ["ssh", "-F", "/keys/ssh_config", "-o", "BatchMode=yes", "-p", "2222", host]
        assert c.argv[8] == (
            f"cd /work && exec env HF_HUB_OFFLINE=1 /venv/bin/python -m launcher.launch.node {host} -- "
            "/venv/bin/python -m torch.distributed.run --nnodes=2 "
            "--nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=node-1:29500 --rdzv_id=run-a "
            f"--local-addr={host} --log-dir=/runs/a/logs/torchrun --tee=3 "
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 "
            "/work/recipes/lora_cls.py --plan /runs/a/plan.json"
        )
        assert len(c.argv) == 9


def test_a_host_left_some_of_its_slots_sees_only_those_devices():
    hosts = select(parse_hostfile("a slots=4\nb slots=4\n"), include="a:2,3@b:0,1")
    commands = ssh_commands(hosts, recipe="r.py", plan_path="p.json", cwd="/w", python="py", rdzv_port=1,
                            run_id="x", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, log_dir="l")  # fmt: skip
    assert "CUDA_VISIBLE_DEVICES=2,3 " in commands[0].argv[-1] and "--nproc_per_node=2" in commands[0].argv[-1]
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3 " in commands[1].argv[-1]  # its first two: local ranks 0 and 1 pick them


def test_hostile_values_reach_the_ranks_as_written_and_never_run(tmp_path):
    """The remote line ssh hands the node's shell, run by a real shell, with a stand-in for python that prints what
    it was given: the value arrives byte for byte and nothing in it executed."""
    marker = tmp_path / "pwned"
    hostile = HOSTILE.format(marker=marker)
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$HOSTILE_VALUE" "$@"\n')
    fake.chmod(0o755)
    (command,) = ssh_commands(
        HOSTS[:1],
        recipe=f"/recipes/{hostile}.py",
        plan_path=str(tmp_path / "a b" / "plan.json"),
        cwd=str(tmp_path),
        python=str(fake),
        rdzv_port=29500,
        run_id="x",
        env={"HOSTILE_VALUE": hostile},
        log_dir=str(tmp_path / "logs"),
    )
    out = subprocess.run(["sh", "-c", command.argv[-1]], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == hostile.splitlines()[0] and f"/recipes/{hostile}.py" in lines
    assert str(tmp_path / "a b" / "plan.json") in lines
    assert not marker.exists()


def test_deepspeeds_env_file_reaches_the_nodes_as_written_through_deepspeeds_own_export(tmp_path):
    """DeepSpeed's runner reads its env file line by line, passes each value through its own `add_export` (which
    wraps a value with special characters in double quotes) and pastes `export NAME=VALUE; ` into the nodes' shell
    command (multinode_runner.PDSHRunner.get_cmd). Done here with DeepSpeed's code, then run by a real shell."""
    from types import SimpleNamespace

    from deepspeed.launcher.multinode_runner import PDSHRunner

    marker = tmp_path / "pwned"
    env = {
        "HF_HOME": "/data/hf cache",
        "WANDB_NOTES": HOSTILE.format(marker=marker),
        "PLAIN": "a-b_c.d/e:f,g@h%i+j=k",
        "QUOTES": 'it\'s "x" \\n',
    }
    runner = SimpleNamespace(exports={})
    for line in deepspeed_env_file(env).splitlines(keepends=True):
        key, val = line.split("=", maxsplit=1)  # as runner.main reads the file
        PDSHRunner.add_export(runner, key, val)
    exports = "".join(f"export {key}={val}; " for key, val in runner.exports.items())  # as get_cmd pastes them
    script = exports + 'printf "%s\\n" "$HF_HOME" "$WANDB_NOTES" "$PLAIN" "$QUOTES"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == list(env.values())
    assert not marker.exists()
    for bad in ("two\nlines", " padded "):
        with pytest.raises(ConfigError, match="WANDB_NOTES: a value with a line break, or with spaces at an end"):
            deepspeed_env_file({"WANDB_NOTES": bad})


def test_the_deepspeed_runner_is_started_without_the_variables_it_would_paste_unquoted():
    environ = {"PATH": "/bin", "PYTHONPATH": "/x", "NCCL_DEBUG": "INFO", "UCX_TLS": "tcp", "HOME": "/root"}
    started = deepspeed_runner_environ(environ, "/runs/a/deepspeed_env")
    assert started == {"PATH": "/bin", "HOME": "/root", "DS_ENV_FILE": "/runs/a/deepspeed_env"}
    command = deepspeed_command(
        "hostfiles/two.txt", HOSTS, recipe="recipes/lora_cls.py", plan_path="/runs/a/plan.json", master_port=29500,
        include="node-1@node-2:0", python="/venv/bin/python", ssh_port=2222,
    )  # fmt: skip
    assert command.argv == [
        "/venv/bin/python",
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile=hostfiles/two.txt",
        "--include=node-1@node-2:0",
        "--launcher=pdsh",
        "--no_ssh_check",
        "--ssh_port=2222",
        "--master_addr=node-1",
        "--master_port=29500",
        "recipes/lora_cls.py",
        "--plan",
        "/runs/a/plan.json",
    ]


def test_the_slurm_runner_is_one_srun_task_per_node():
    command = srun_command(HOSTS, recipe="r.py", plan_path="/runs/a/plan.json", python="/venv/bin/python",
                           rdzv_port=29500, run_id="job-7")  # fmt: skip
    assert command.argv == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--nodelist=node-1,node-2", "--kill-on-bad-exit=1",
        "/venv/bin/python", "-m", "launcher.launch.node", "--no-stdin", "-", "--",
        "/venv/bin/python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
        "--rdzv_backend=c10d", "--rdzv_endpoint=node-1:29500", "--rdzv_id=job-7",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2", "r.py", "--plan", "/runs/a/plan.json",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"every node must run the same number of processes \(slots: a=2, b=1\)"):
        srun_command(parse_hostfile("a slots=2\nb slots=1\n"), recipe="r", plan_path="p", python="py", rdzv_port=1,
                     run_id="x")  # fmt: skip


def test_the_environment_sent_is_an_allowlist_and_secrets_are_shown_masked():
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "NCCL_IB_DISABLE": "1",
        "CUDA_LAUNCH_BLOCKING": "1",
        "PYTHONPATH": "/src",
        "HF_TOKEN": "hf_secret_value",
        "WANDB_API_KEY": "wandb_secret_value",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MY_SETTING": "kept",
        "AWS_SECRET_ACCESS_KEY": "aws_secret_value",
        "UNRELATED": "dropped",
    }
    env = forwarded_env(environ, names=("MY_SETTING",), env_file={"DB_PASSWORD": "pw_value", "HF_HOME": "/hf"})
    assert set(env) == {
        "NCCL_IB_DISABLE", "CUDA_LAUNCH_BLOCKING", "PYTHONPATH", "HF_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_URI",
        "MY_SETTING", "DB_PASSWORD", "HF_HOME",
    }  # fmt: skip
    (command,) = ssh_commands(HOSTS[:1], recipe="r.py", plan_path="p", cwd="/w", python="py", rdzv_port=1,
                              run_id="x", env=env, log_dir="l")  # fmt: skip
    assert "hf_secret_value" in command.argv[-1] and "pw_value" in command.argv[-1]  # sent...
    for secret in ("hf_secret_value", "wandb_secret_value", "pw_value"):
        assert secret not in command.shown  # ...never shown
    remote = shlex.split(command.shown)[-1]
    assert "HF_TOKEN='***'" in remote and "DB_PASSWORD='***'" in remote and "MY_SETTING=kept" in remote
    with pytest.raises(ConfigError, match="--env MY_TYPO: not set in this environment"):
        forwarded_env(environ, names=("MY_TYPO",))


def test_an_env_file_is_name_value_lines_and_a_bad_line_is_named():
    text = "# for every node\nHF_HOME=/data/hf\n\nNOTES=a=b c\n"
    assert parse_env_file(text) == {"HF_HOME": "/data/hf", "NOTES": "a=b c"}
    with pytest.raises(ConfigError) as e:
        parse_env_file("OK=1\nnot a line\n1BAD=2\n", source=".launcher_env")
    assert [p.split(":")[0] for p in e.value.problems] == [".launcher_env, line 2", ".launcher_env, line 3"]
    assert "write NAME=VALUE" in str(e.value)


def test_nothing_here_reads_the_real_environment(monkeypatch):
    """Pure: the builders take the environment they are given (a launcher test must not depend on this shell): a
    forwarded family's variable set in this process reaches nothing it was not given."""
    monkeypatch.setenv("HF_SENTINEL_OF_THIS_SHELL", "1")
    before = dict(os.environ)
    assert forwarded_env({"HF_X": "1"}) == {"HF_X": "1"}
    assert forwarded_env({"HF_X": "1"}, names=("HF_X",)) == {"HF_X": "1"}
    assert dict(os.environ) == before


TORCHRUN_FAILURE = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
/tmp/kill1.py FAILED
-------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_18:03:11
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 21094)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 21094
=======================================================
"""


def test_the_node_side_reads_the_first_failing_rank_from_torchruns_summary():
    """torchrun exits 1 whatever its worker did; the node side reports the root cause's rank, pid and code (the
    summary above is torchrun 2.13's own, from a worker killed by SIGKILL)."""
    from launcher.launch.node import Summary

    summary = Summary()
    for line in TORCHRUN_FAILURE.splitlines(keepends=True):
        summary.see(line)
    assert (summary.rank, summary.pid, summary.code) == (1, 21094, -9)
    nothing = Summary()
    nothing.see("  rank      : 3 (local_rank: 1)\n")  # outside a failure summary: not a result
    assert nothing.rank is None


def test_a_ranks_code_is_read_back_from_deepspeeds_node_launcher():
    """DeepSpeed's launch exits with its failed rank's return code: a rank killed by SIGKILL (-9) reaches pdsh as
    247 (`sys.exit(-9)`); a rank's own exit code comes as itself."""
    from launcher.launch.remote import PDSH_FAILED, _deepspeed_code

    line = "pdsh@vm: 127.0.0.2: ssh exited with exit code 247\n"
    assert PDSH_FAILED.match(line).group("host", "code") == ("127.0.0.2", "247")
    assert (_deepspeed_code(247), _deepspeed_code(3), _deepspeed_code(1)) == (-9, 3, 1)


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--runner", "ssh"], "--runner ssh needs --hostfile FILE"),
        (["--hostfile", "no-such-hosts.txt"], "--hostfile no-such-hosts.txt: no such file"),
        (["--hostfile", "hostfiles/loopback-two-nodes.txt", "--max-restarts", "1"], "--max-restarts 1: restarts are"),
        (["--hostfile", "hostfiles/loopback-two-nodes.txt", "--include", "127.0.0.9"], "127.0.0.9"),
        (["--hostfile", "hostfiles/loopback-two-nodes.txt", "--env", "NOT_SET_ANYWHERE"], "--env NOT_SET_ANYWHERE"),
        (["--runner", "slurm"], "SLURM_JOB_NODELIST is not set"),
    ],
)
def test_a_multi_node_usage_error_is_named_with_exit_2(argv, said, capsys, monkeypatch):
    from launcher.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    assert main(["run", "recipes/lora_cls.py", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_a_dry_run_of_deepspeeds_runner_shows_its_env_file_with_secrets_masked(tmp_path, capsys, monkeypatch):
    from launcher.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_TOKEN", "hf_dry_run_secret")
    out_dir = tmp_path / "run"
    argv = ["run", "recipes/lora_cls.py", "--hostfile", "hostfiles/loopback-two-nodes.txt", "--runner", "deepspeed",
            "--dry-run", f"output_dir={out_dir}"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "deepspeed.launcher.runner" in out and "--hostfile=" in out and "--no_ssh_check" in out
    assert "HF_TOKEN=***" in out and "hf_dry_run_secret" not in out
    assert not out_dir.exists()


def test_a_ranks_lines_under_deepspeeds_runner_get_its_host_and_rank(monkeypatch, capsys):
    import sys

    from launcher.worker.prefix import prefix_lines

    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    prefix_lines({"LAUNCHER_HOSTS": "node-1,node-2", "CROSS_RANK": "1", "RANK": "3"})
    print("step 1/2", flush=True)
    sys.stdout.write("a\nb")
    sys.stdout.write(" c\n")
    assert capsys.readouterr().out == "[node-2:3] step 1/2\n[node-2:3] a\n[node-2:3] b c\n"
    before = sys.stdout
    prefix_lines({"CROSS_RANK": "0"})  # not under our launch: nothing changes
    assert sys.stdout is before

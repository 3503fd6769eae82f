"""`launcher sbatch` on a real one-node Slurm cluster (munge, slurmctld, slurmd started once per session by
scripts/slurm_cluster.sh): the batch script it writes runs lora_cls on 2 processes; sent its pre-timeout signal,
the job checkpoints, requeues itself, resumes from that checkpoint and ends as a run never stopped."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time

import pytest

from launcher.checkpoints import complete
from tests.conftest import LONG, RECIPE, ROOT, last_loss, launcher_cli, run, tiny_args, why_failed


def _job(job_id: str, env: dict) -> dict[str, str]:
    """scontrol's fields of a job (completed jobs stay visible for MinJobAge, 300 s)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job_id: str, env: dict, until, seconds: float) -> dict[str, str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fields = _job(job_id, env)
        if until(fields):
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} after {seconds:g} s: {_job(job_id, env)}")


def _node_idle(job_id: str, env: dict, seconds: float = 60) -> None:
    """Until the node has ended every step of the job's last start (no step left, sinfo says idle), and a moment
    more for slurmd, which forgets a killed job a little after the controller."""
    deadline, quiet = time.monotonic() + seconds, 0
    while quiet < 3:
        assert time.monotonic() < deadline, f"the node is still busy after {seconds:g} s"
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout.strip()
        steps = subprocess.run(["squeue", "-h", "-s", "-j", job_id], capture_output=True, text=True, env=env).stdout
        quiet = quiet + 1 if state == "idle" and not steps.strip() else 0
        time.sleep(0.5)
    time.sleep(5.0)


@pytest.mark.long  # a real Slurm cluster (scripts/slurm_cluster.sh)
def test_a_batch_job_checkpoints_on_its_signal_requeues_and_resumes_to_the_same_end(
    slurm_cluster, tiny_model, tiny_data, tmp_path, uninterrupted
):
    env = {**os.environ, **slurm_cluster}
    out = tmp_path / "run"
    argv = ["launcher", "sbatch", RECIPE, "--procs-per-node", "2", "--time", "30", "--submit",
            *tiny_args(tiny_model, tiny_data, out, *LONG)]  # fmt: skip
    submitted = run(argv, cwd=ROOT, env=slurm_cluster, timeout=120)
    assert submitted.returncode == 0, why_failed(submitted)
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    script = (out / "job.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@120" in script and "resume=auto" in script
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 180
        while not (metrics.exists() and metrics.stat().st_size > 0):  # training has begun
            assert time.monotonic() < deadline, f"training never started: {_job(job_id, env)}"
            time.sleep(0.2)
        # What Slurm does at --signal=B:USR1@120 before the time limit, now.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, env=env)
        requeued = _wait(job_id, env, lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING", 120)
        found = complete(str(out))
        assert len(found) == 1 and 0 < found[0][0] < 300, found
        assert requeued["Requeue"] == "1"
        # Slurm holds a requeued job back for two minutes (its begin time): long enough for the node to finish
        # the last start (a start sent sooner is refused: "Job N already killed, do not launch batch job"). Once
        # the node is idle again, let the job start now.
        _node_idle(job_id, env)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, env=env)
        done = _wait(job_id, env, lambda f: f.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING"), 240)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True)
    log = (out / "logs" / f"slurm-{job_id}.out").read_text()
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", f"{done}\n{log[-4000:]}"
    assert f"launcher sbatch: job {job_id} start 0" in log and f"launcher sbatch: job {job_id} start 1" in log
    assert "checkpoint written before the time limit; requeueing" in log
    assert f"after step {found[0][0]} of 300: checkpoint {found[0][1]} written" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == found[0][1] and summary["steps"] == 300
    assert last_loss(out) == pytest.approx(last_loss(uninterrupted), abs=1e-6)


def test_sbatch_refuses_bad_options_before_writing_anything(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    for extra, said in [
        (["--time", "four hours"], "--time four hours: write minutes, HH:MM:SS"),
        (["--partition", "gpu;rm -rf /"], "--partition 'gpu;rm -rf /'"),
        (["--gpus-per-node", "8", "--procs-per-node", "2"], "give one"),
    ]:
        proc = launcher_cli(["sbatch", RECIPE, *extra, *tiny_args(tiny_model, tiny_data, out)], cwd=ROOT)
        assert proc.returncode == 2 and said in proc.stderr, why_failed(proc)
        assert "Traceback" not in proc.stderr and not out.exists()


def test_the_batch_script_hands_every_setting_to_the_launcher_as_written(tmp_path):
    """The script's command line, read by a real bash: each setting arrives as one argument, byte for byte, and
    nothing in it runs."""
    from launcher.launch.sbatch import BatchJob, batch_script

    marker = tmp_path / "pwned"
    hostile = f"data.train=/data/a b/$(touch {marker})`touch {marker}`'x'\"y\".jsonl"
    job = BatchJob(recipe="/r/lora_cls.py", name="lora_cls", run_dir=str(tmp_path / "run dir"), cwd="/w",
                   python="/venv/bin/python", nodes=2, procs_per_node=8, gpus_per_node=8, time="4:00:00",
                   partition="gpu", account="proj", settings=[hostile, "train.lr=1e-4"])  # fmt: skip
    script = batch_script(job)
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=4:00:00", "--partition=gpu",
                 "--account=proj", "--requeue", "--signal=B:USR1@120", "--open-mode=append"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    run_line = next(line for line in script.splitlines() if line.startswith("run=("))
    shown = subprocess.run(["bash", "-c", f'{run_line}\nprintf "%s\\n" "${{run[@]}}"'], capture_output=True,
                           text=True, check=True).stdout.splitlines()  # fmt: skip
    assert shown == [
        "/venv/bin/python", "-m", "launcher", "run", "/r/lora_cls.py", "--runner", "slurm", "--nproc", "8",
        hostile, "train.lr=1e-4", f"output_dir={tmp_path / 'run dir'}", "resume=auto",
    ]  # fmt: skip
    assert not marker.exists()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # the whole script parses


HOSTILE = "$(touch {marker})`touch {marker}`'single'\"double\" \\back"


def test_the_whole_batch_script_runs_under_bash_with_hostile_values_as_written(tmp_path):
    """Every value the script carries (the recipe's path, the run folder, the working folder, the Python, the
    settings) holding quotes, $(...) and backticks: bash runs the script to its end, the launcher it starts gets each
    value as one argument byte for byte, and nothing in them runs."""
    from launcher.launch.sbatch import BatchJob, batch_script

    odd = HOSTILE.format(marker="PWNED")  # run in the script's working folder: a relative name
    folder = tmp_path / f"w {odd}"
    folder.mkdir()
    python = folder / "python"  # stands in for the launcher: writes the arguments it was given, one per line
    python.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(tmp_path / "argv"))}\n')
    python.chmod(0o755)
    recipe, run_dir = str(folder / "recipe.py"), str(folder / "run")
    job = BatchJob(recipe=recipe, name="lora_cls", run_dir=run_dir, cwd=str(folder), python=str(python),
                   settings=[f"data.train={odd}.jsonl", f"tracking.run_name={odd}"])  # fmt: skip
    script = tmp_path / "job.sbatch"
    script.write_text(batch_script(job))
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "launcher sbatch: job 7 start 0" in done.stdout, done.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "-m", "launcher", "run", recipe, "--runner", "slurm", "--nproc", "1", f"data.train={odd}.jsonl",
        f"tracking.run_name={odd}", f"output_dir={run_dir}", "resume=auto",
    ]  # fmt: skip
    output = next(line for line in script.read_text().splitlines() if line.startswith("#SBATCH --output="))
    assert output == '#SBATCH --output="' + run_dir.replace("\\", "\\\\").replace('"', '\\"') + '/logs/slurm-%j.out"'
    assert not list(tmp_path.rglob("PWNED"))


def test_a_control_character_in_any_value_of_a_script_or_command_is_refused_naming_it(tmp_path, capsys):
    """A line break would end the script's line and run what follows: refused in every value (exit 2 on the
    command line, before anything is written), for the batch script and for every runner's command (their dry runs
    included)."""
    from launcher.errors import ConfigError
    from launcher.launch.sbatch import BatchJob, check

    fields = {"recipe": "the recipe's path", "run_dir": "output_dir", "cwd": "the working folder",
              "python": "the Python", "name": "the job's name"}  # fmt: skip
    for field, named in fields.items():
        values = {"recipe": "/r.py", "name": "n", "run_dir": "/runs/a", "cwd": "/w", "python": "/py"}
        values[field] += "\ntouch PWNED #"
        with pytest.raises(ConfigError, match=re.escape(f"{named} {values[field]!r}: holds a line break")):
            check(BatchJob(**values))
    with pytest.raises(ConfigError, match="a setting 'seed=1\\\\x1b\\[2J': holds an escape"):
        check(BatchJob(recipe="/r.py", name="n", run_dir="/runs/a", cwd="/w", python="/py", settings=["seed=1\x1b[2J"]))
    bad = "output_dir=runs/x\ntouch PWNED #"
    out = tmp_path / "runs"
    # Inside an allocation (srun's command): Slurm's node list, expanded by a stand-in for its scontrol.
    fake = tmp_path.parent / f"{tmp_path.name}-bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho n1\necho n2\n")
    (fake / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_NODELIST": "n[1-2]", "PATH": f"{fake}:{os.environ['PATH']}"}
    for argv in (
        ["sbatch", RECIPE, "--procs-per-node", "2", bad],
        ["run", RECIPE, "--nproc", "2", bad],
        ["run", RECIPE, "--nproc", "2", "--dry-run", bad],
        ["run", RECIPE, "--hostfile", str(ROOT / "hostfiles/loopback-two-nodes.txt"), "--dry-run", bad],
        ["run", RECIPE, "--hostfile", str(ROOT / "hostfiles/loopback-two-nodes.txt"), "--runner", "deepspeed", bad],
        ["run", RECIPE, "--nproc", "2", f"data.train={tmp_path}/a\rb.jsonl"],
        ["run", RECIPE, "--runner", "slurm", "--dry-run", bad],
    ):
        proc = launcher_cli(argv, cwd=tmp_path, env=slurm if "slurm" in argv else None)
        assert proc.returncode == 2 and "which no command line or batch script may carry" in proc.stderr, proc.stderr
        assert ("output_dir='runs/x\\ntouch PWNED #'" in proc.stderr) or "data.train=" in proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists() and not (tmp_path / "PWNED").exists()
    assert sorted(os.listdir(tmp_path)) == [], "nothing written"


def test_the_submit_hint_is_a_shell_line(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "it's a run"
    proc = launcher_cli(["sbatch", RECIPE, "--procs-per-node", "2", *tiny_args(tiny_model, tiny_data, out)], cwd=ROOT)
    assert proc.returncode == 0, why_failed(proc)
    hint = next(line for line in proc.stdout.splitlines() if line.startswith("submit it with: "))
    assert shlex.split(hint.removeprefix("submit it with: ")) == ["sbatch", str(out / "job.sbatch")]


def test_a_password_in_the_tracking_uri_is_refused_for_a_batch_script(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    uri = "tracking.mlflow_uri=https://alice:s3cret@mlflow.example/x"
    proc = launcher_cli(["sbatch", RECIPE, *tiny_args(tiny_model, tiny_data, out, uri)], cwd=ROOT)
    assert proc.returncode == 2 and "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr and not out.exists()

"""`launcher sbatch`: a Slurm batch script for a recipe, pure. The script is written to be read: its header says
what each start does, and every value in it is quoted for the shell.

Each start of the job runs `launcher run --runner slurm` (one srun task per node, each a torchrun, rendezvous on the
first node of the allocation) with `resume=auto`. `--signal=B:USR1@S` has Slurm send USR1 to the batch shell S
seconds before the time limit; the script passes it to the launcher, which passes it to every rank: they finish
their step, save a checkpoint and exit 75. The script then requeues the job (`--requeue`), and the next start
resumes from that checkpoint.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from launcher.errors import REQUEUE_EXIT_CODE, ConfigError
from launcher.overrides import control_characters

SCRIPT_NAME = "job.sbatch"
"""The batch script's name in the run directory."""
TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
"""Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")


@dataclass(frozen=True)
class BatchJob:
    """What the batch script runs and asks Slurm for."""

    recipe: str
    """The recipe's absolute path."""
    name: str
    """The job's name (the recipe's)."""
    run_dir: str
    """The run directory (absolute): the script, Slurm's output, the plan, checkpoints."""
    cwd: str
    """Where the job works (the project, as on the submitting machine)."""
    python: str
    """The Python of the launcher (the same path on every node)."""
    nodes: int = 1
    procs_per_node: int = 1
    """Processes per node: the GPUs asked for, or processes on CPU nodes."""
    gpus_per_node: int = 0
    """GPUs asked per node (0: CPU nodes, no GPU is asked for)."""
    time: str = ""
    """The time limit (Slurm's form, e.g. 4:00:00); empty: the partition's default."""
    partition: str = ""
    account: str = ""
    signal_seconds: int = 120
    """How long before the time limit the job is asked to checkpoint and stop."""
    settings: list[str] = field(default_factory=list)
    """The recipe's key=value settings, as given (output_dir and resume are added)."""


def check(job: BatchJob) -> None:
    """ConfigError naming every bad option and its fix."""
    problems = []
    if job.nodes < 1:
        problems.append(f"--nodes {job.nodes}: give at least 1")
    if job.procs_per_node < 1:
        problems.append("--gpus-per-node or --procs-per-node: give at least 1 process per node")
    if job.time and not TIME.match(job.time):
        problems.append(f"--time {job.time}: write minutes, HH:MM:SS or D-HH:MM:SS (Slurm's forms), e.g. 4:00:00")
    for flag, value in (("--partition", job.partition), ("--account", job.account)):
        if value and not SLURM_NAME.match(value):
            problems.append(f"{flag} {value!r}: letters, digits, '_', '-', '.', ',' only")
    named = [
        ("the recipe's path", job.recipe),
        ("output_dir", job.run_dir),
        ("the working folder", job.cwd),
        ("the Python", job.python),
        ("the job's name", job.name),
        *(("a setting", v) for v in job.settings),
    ]
    for what, value in named:
        why = control_characters(value)
        if why:
            problems.append(f"{what} {value!r}: {why}")
    if "%" in job.run_dir:
        problems.append(
            f"output_dir={job.run_dir}: '%' starts one of Slurm's file name patterns in the #SBATCH --output line; "
            "give an output_dir without it"
        )
    if job.signal_seconds < 10:
        problems.append(f"--signal-seconds {job.signal_seconds}: give the ranks at least 10 s to checkpoint")
    if problems:
        raise ConfigError(problems)


def _sbatch_quoted(value: str) -> str:
    """A value as sbatch reads it from an #SBATCH line: in double quotes (spaces kept), a double quote or backslash
    escaped with a backslash (the line is Slurm's to parse, never the shell's)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def batch_script(job: BatchJob) -> str:
    check(job)
    q = shlex.quote
    run = [
        job.python, "-m", "launcher", "run", job.recipe, "--runner", "slurm", "--nproc", str(job.procs_per_node),
        *job.settings, f"output_dir={job.run_dir}", "resume=auto",
    ]  # fmt: skip
    where = f"{job.nodes} node(s) x {job.procs_per_node} process(es)"
    asks = [
        f"--job-name={job.name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        *([f"--time={job.time}"] if job.time else []),
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--account={job.account}"] if job.account else []),
        "--requeue",
        f"--signal=B:USR1@{job.signal_seconds}",
        "--open-mode=append",
        f"--output={_sbatch_quoted(job.run_dir + '/logs/slurm-%j.out')}",
    ]
    lines = [
        "#!/bin/bash",
        f"# {job.name} on {where}, written by `launcher sbatch`; submit it with: sbatch {q(job.run_dir)}/{SCRIPT_NAME}",
        "# Each start runs `launcher run --runner slurm` (one srun task per node, each a torchrun) with resume=auto.",
        f"# {job.signal_seconds} s before the time limit Slurm sends USR1 to this script, which passes it on: the",
        f"# ranks save a checkpoint and exit {REQUEUE_EXIT_CODE}, this script requeues the job, and the next start "
        "resumes there.",
        *(f"#SBATCH {a}" for a in asks),
        "set -uo pipefail",
        f"cd {q(job.cwd)}",
        f"run=({' '.join(q(a) for a in run)})",
        'echo "launcher sbatch: job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        '"${run[@]}" &',
        "pid=$!",
        "trap 'kill -USR1 \"$pid\"' USR1",
        "code=0",
        'wait "$pid" || code=$?',
        'while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the launcher again',
        "  code=0",
        '  wait "$pid" || code=$?',
        "done",
        f'if [ "$code" -eq {REQUEUE_EXIT_CODE} ]; then',
        '  echo "launcher sbatch: checkpoint written before the time limit; requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"

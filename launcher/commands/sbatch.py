"""`launcher sbatch`: the plan checked here (settings, data) for the job's processes, then the batch script written
into the run directory, and submitted with --submit."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from launcher.data.files import scratch_cache
from launcher.environment import quiet_libraries
from launcher.errors import ConfigError
from launcher.files import write_atomic
from launcher.job import LaunchEnv
from launcher.launch.sbatch import SCRIPT_NAME, BatchJob, batch_script
from launcher.overrides import split_override
from launcher.plan import PLAN_FILE, build_plan
from launcher.recipe import Recipe
from launcher.tracking import credentials_env

NAME, SETTINGS = "sbatch", True


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        NAME, help="write a Slurm batch script for a recipe (requeued and resumed at its time limit); --submit sends it"
    )
    parser.add_argument("recipe", help="path of the recipe module")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings, as for launcher run")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to ask for (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=0, metavar="G", help="GPUs per node, one process each")
    parser.add_argument(
        "--procs-per-node", type=int, default=0, metavar="P", help="processes per node on CPU nodes (no GPU asked)"
    )
    parser.add_argument("--time", default="", help="time limit, e.g. 4:00:00 (default: the partition's)")
    parser.add_argument("--partition", default="", help="Slurm partition")
    parser.add_argument("--account", default="", help="Slurm account")
    parser.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        metavar="S",
        help="ask the ranks to checkpoint and stop S seconds before the time limit (default 120)",
    )
    parser.add_argument("--submit", action="store_true", help="submit the script with sbatch and print the job id")
    return parser


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    if args.gpus_per_node and args.procs_per_node:
        raise ConfigError("--gpus-per-node and --procs-per-node: give one (GPUs run one process each)")
    per_node = args.gpus_per_node or args.procs_per_node or 1
    given = {split_override(o)[0] for o in args.overrides}
    if "resume" in given:
        raise ConfigError("resume=: every start of the batch job resumes from its newest checkpoint; drop resume=")
    recipe = Recipe.load(args.recipe)
    gpu = args.gpus_per_node > 0
    env = LaunchEnv(
        world_size=args.nodes * per_node, local_world_size=per_node, cuda=gpu, gpus=args.gpus_per_node,
        bf16_supported=gpu, hosts=tuple(f"node-{i}" for i in range(args.nodes)) if args.nodes > 1 else (),
    )  # fmt: skip
    print(f"{recipe.name}: checking the settings and the data for {args.nodes} x {per_node} process(es)", flush=True)
    with scratch_cache():
        plan = build_plan(recipe, args.overrides, env)
    run_dir = os.path.abspath(plan.config.output_dir)
    if os.path.exists(os.path.join(run_dir, PLAN_FILE)):
        raise ConfigError(
            f"output_dir={plan.config.output_dir} already holds a run: give another output_dir (the job would resume "
            "that run)"
        )
    if credentials_env(plan.config.tracking.mlflow_uri):
        raise ConfigError(
            "tracking.mlflow_uri holds a password, which the batch script would keep in plain text: give the URI "
            "without it and export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD before sbatch (Slurm "
            "passes the environment on)"
        )
    settings = [o for o in args.overrides if split_override(o)[0] != "output_dir"]
    job = BatchJob(
        recipe=recipe.path, name=recipe.name, run_dir=run_dir, cwd=os.getcwd(), python=sys.executable,
        nodes=args.nodes, procs_per_node=per_node, gpus_per_node=args.gpus_per_node, time=args.time,
        partition=args.partition, account=args.account, signal_seconds=args.signal_seconds, settings=settings,
    )  # fmt: skip
    script = batch_script(job)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)  # Slurm writes its output there, and makes no folder
    path = os.path.join(run_dir, SCRIPT_NAME)
    write_atomic(path, script)
    print(f"wrote {path}")
    if not args.submit:
        print(f"submit it with: sbatch {shlex.quote(path)}")
        return 0
    return _submit(path, run_dir)


def _submit(path: str, run_dir: str) -> int:
    try:
        out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    except FileNotFoundError:
        print("launcher: sbatch is not on PATH (run this on a Slurm login node, or submit the script there)")
        return 1
    if out.returncode != 0:
        print(f"launcher: sbatch refused {path}: {out.stderr.strip()}", file=sys.stderr)
        return out.returncode
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}; its output: {run_dir}/logs/slurm-{job_id}.out")
    return 0

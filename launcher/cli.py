"""`launcher` command line. Heavy libraries are imported only by the commands that need them, so
`launcher --help` answers at once."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import sys

from launcher.errors import USAGE_EXIT_CODE, ConfigError

UNREACHABLE_EXIT_CODE = 255
"""A host ssh cannot reach (ssh's own code for it)."""

EPILOG = """examples:
  launcher run recipes/lora_cls.py --nproc 2 strategy=zero2 train.max_steps=50
  launcher run recipes/lora_cls.py --nproc 2 --dry-run strategy=zero3
  launcher run recipes/lora_cls.py --nproc 2 strategy=zero3 adapter=qlora optimizer=adamw8bit
  launcher run recipes/lora_cls.py --hostfile hostfiles/two-nodes.txt strategy=zero3   (every node: ssh + torchrun)
  launcher sbatch recipes/lora_cls.py --nodes 2 --gpus-per-node 8 --time 4:00:00 --submit   (Slurm, requeues itself)
  launcher plan recipes/qlora_sft.py model=llama-3-70b adapter=qlora --gpus-per-node 8 --gpu-mem 80GiB
  launcher export runs/sst2/checkpoints/step-00000500 --out sst2-model --merge
  launcher matrix                          (which strategy x adapter x optimizer combinations work)
  launcher recipes                         (the recipes, one line each)
  launcher new my_cls --from lora_cls      (copy a recipe to recipes/my_cls.py, ready to edit)
  python recipes/lora_cls.py --help        (every setting of a recipe, with its default)
"""


def build_parser() -> argparse.ArgumentParser:
    from launcher.launch.cluster import RUNNERS

    parser = argparse.ArgumentParser(
        prog="launcher",
        description="Fine-tune transformer models from plain Python recipes, on one or many processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a recipe on local processes",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", help="path of the recipe module, e.g. recipes/lora_cls.py")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. strategy=zero2 train.lr=1e-4")
    run.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    run.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="after a rank fails, start every rank again from the newest checkpoint, up to N times (default 0)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved configuration, the command of each rank and the DeepSpeed JSON; start nothing",
    )
    nodes = run.add_argument_group("many nodes (hostfiles/README.md)")
    nodes.add_argument("--hostfile", metavar="FILE", help="the nodes, one 'HOST slots=N' per line")
    nodes.add_argument(
        "--runner",
        choices=RUNNERS,
        help="ssh: one torchrun per node over ssh (default with --hostfile); deepspeed: DeepSpeed's runner over "
        "pdsh; slurm: one srun task per node of this allocation (default inside one, --nproc per node)",
    )
    nodes.add_argument("--include", default="", metavar="SPEC", help="only these hosts/slots, e.g. node-1@node-2:0,1")
    nodes.add_argument("--exclude", default="", metavar="SPEC", help="all but these hosts/slots, e.g. node-2:7")
    nodes.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="also send this variable to every node (NCCL_*, CUDA_*, PYTHON*, HF_*, WANDB_*, MLFLOW_* always go)",
    )
    nodes.add_argument(
        "--env-file", metavar="FILE", help="NAME=VALUE lines every node gets (default: ./.launcher_env if present)"
    )
    nodes.add_argument("--ssh-config", metavar="FILE", help="ssh client configuration to reach the hosts (ssh -F)")
    nodes.add_argument("--ssh-port", type=int, metavar="N", help="the hosts' ssh port")
    nodes.add_argument(
        "--no-check", action="store_true", help="skip the check that ssh reaches every host before starting"
    )
    nodes.add_argument(
        "--master-port",
        type=int,
        metavar="N",
        help="rendezvous port on the first host (default: a free one when it is this machine, else 29500)",
    )
    check = sub.add_parser(
        "check",
        help="check every host of a hostfile: ssh, versions, GPUs against slots, disk, an all-reduce across them",
    )
    check.add_argument("--hostfile", required=True, metavar="FILE", help="the nodes, one 'HOST slots=N' per line")
    check.add_argument("--include", default="", metavar="SPEC", help="only these hosts/slots")
    check.add_argument("--exclude", default="", metavar="SPEC", help="all but these hosts/slots")
    check.add_argument("--ssh-config", metavar="FILE", help="ssh client configuration to reach the hosts (ssh -F)")
    check.add_argument("--ssh-port", type=int, metavar="N", help="the hosts' ssh port")
    check.add_argument("--master-port", type=int, metavar="N", help="port of the all-reduce's rendezvous")
    check.add_argument("--output-dir", default=".", metavar="DIR", help="where runs will write (default: here)")
    check.add_argument("--gpu", action="store_true", help="the run uses GPUs: each host needs one per slot")
    sbatch = sub.add_parser(
        "sbatch",
        help="write a Slurm batch script for a recipe (requeued and resumed at its time limit); --submit sends it",
    )
    sbatch.add_argument("recipe", help="path of the recipe module")
    sbatch.add_argument("overrides", nargs="*", metavar="key=value", help="settings, as for launcher run")
    sbatch.add_argument("--nodes", type=int, default=1, help="nodes to ask for (default 1)")
    sbatch.add_argument("--gpus-per-node", type=int, default=0, metavar="G", help="GPUs per node, one process each")
    sbatch.add_argument(
        "--procs-per-node", type=int, default=0, metavar="P", help="processes per node on CPU nodes (no GPU asked)"
    )
    sbatch.add_argument("--time", default="", help="time limit, e.g. 4:00:00 (default: the partition's)")
    sbatch.add_argument("--partition", default="", help="Slurm partition")
    sbatch.add_argument("--account", default="", help="Slurm account")
    sbatch.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        metavar="S",
        help="ask the ranks to checkpoint and stop S seconds before the time limit (default 120)",
    )
    sbatch.add_argument("--submit", action="store_true", help="submit the script with sbatch and print the job id")
    plan = sub.add_parser(
        "plan",
        help="memory per GPU and per node of each strategy for a recipe's model and adapter, before launch "
        "(the model counted from its config.json, no weights read)",
    )
    plan.add_argument("recipe", help="path of the recipe module")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. model=llama-3-8b adapter=qlora")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--gpus-per-node", type=int, default=8, metavar="G", help="GPUs per node (default 8)")
    plan.add_argument("--gpu-mem", default="80GiB", metavar="SIZE", help="memory of one GPU (default 80GiB)")
    plan.add_argument("--cpu-mem", default="1TiB", metavar="SIZE", help="host memory of one node (default 1TiB)")
    plan.add_argument(
        "--seq-len", type=int, default=0, metavar="S", help="tokens per example (default: the recipe's data.max_length)"
    )
    plan.add_argument(
        "--gpu-tflops",
        type=float,
        default=989.0,
        metavar="T",
        help="one GPU's peak TFLOP/s for the time per epoch (default 989: H100 SXM, dense bf16)",
    )
    plan.add_argument(
        "--row", metavar="NAME", help="a row to say the largest micro-batch and sequence of, and to --verify"
    )
    plan.add_argument(
        "--verify",
        action="store_true",
        help="train the recommended row (or --row) for 2 steps on 2 CPU processes, on a scaled-down model of the "
        "same family where the given one is too large here, and print measured against planned bytes",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    export = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model folder (the adapter, or merged with --merge)",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder: OUTPUT_DIR/checkpoints/step-N")
    export.add_argument("--out", required=True, metavar="DIR", help="the new model folder (must not exist yet)")
    export.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base weights (a quantized base is dequantized, the model written in bf16)",
    )
    export.add_argument(
        "--recipe",
        default="",
        metavar="PATH",
        help="the recipe that rebuilds the model (default: the checkpoint's own copy of the recipe that wrote it)",
    )
    matrix = sub.add_parser(
        "matrix",
        help="show which strategy x adapter x optimizer combinations are supported, and why not",
    )
    matrix.add_argument("--markdown", action="store_true", help="print the docs page (docs/matrix.md) instead")
    report = sub.add_parser(
        "report",
        help="write report.html and report.png for one or more run directories (loss, eval, lr, throughput, memory "
        "over steps, overlaid; the settings they differ in)",
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (several: overlaid)")
    report.add_argument("--out", metavar="DIR", help="where to write them (default: the run directory, or ./report)")
    recipes = sub.add_parser("recipes", help="list the recipes with a one-line description each")
    recipes.add_argument("--dir", default="recipes", help="folder holding the recipes (default: ./recipes)")
    new = sub.add_parser("new", help="copy a recipe into recipes/NAME.py, ready to edit")
    new.add_argument("name", metavar="NAME", help="the new recipe's name, e.g. my_cls")
    new.add_argument("--from", dest="source", default="lora_cls", help="recipe to copy (default: lora_cls)")
    new.add_argument("--dir", default="recipes", help="folder holding the recipes (default: ./recipes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `launcher matrix | head`: the reader has what it wanted; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush goes nowhere
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_EXIT_CODE
    if args.command in ("matrix", "recipes", "new", "export", "check", "report"):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            commands = {
                "matrix": cmd_matrix, "recipes": cmd_recipes, "new": cmd_new, "export": cmd_export, "check": cmd_check,
                "report": cmd_report,
            }  # fmt: skip
            return commands[args.command](args)
        except ConfigError as e:
            print(e.render(), file=sys.stderr)
            return USAGE_EXIT_CODE
    # Settings may come before or after the flags: `run R a=1 --nproc 2 b=2`.
    flags = [a for a in extra if a.startswith("-") or "=" not in a]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)} (settings are key=value)")
    args.overrides = list(args.overrides) + extra
    try:
        return {"sbatch": cmd_sbatch, "plan": cmd_plan}.get(args.command, cmd_run)(args)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return USAGE_EXIT_CODE


def cmd_report(args: argparse.Namespace) -> int:
    from launcher.report import write_report

    out = args.out or (args.runs[0] if len(args.runs) == 1 else "report")
    png, page = write_report(args.runs, out)
    print(f"report: {page}\nplot:   {png}")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from launcher.compat_view import print_matrix, render_markdown

    if args.markdown:
        sys.stdout.write(render_markdown())
    else:
        print_matrix()
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from launcher.authoring import describe_recipes
    from launcher.console import make_console

    table = Table(title=f"recipes in {args.dir}", title_justify="left")
    table.add_column("recipe", style="bold cyan", no_wrap=True)
    table.add_column("description")
    for name, description in describe_recipes(args.dir):
        table.add_row(name, description)
    make_console().print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.environment import quiet_libraries

    quiet_libraries()
    from launcher.worker.export_checkpoint import export

    print(f"launcher: exporting {args.checkpoint}{' (merged)' if args.merge else ''}", flush=True)
    done = export(args.checkpoint, args.out, merge=args.merge, recipe_path=args.recipe)
    for note in done.notes:
        print(f"note: {note}")
    what = {"adapter": "the adapter (peft)", "merged": "the merged model", "model": "the model"}[done.kind]
    print(f"wrote {what} to {done.folder}")
    if done.max_logit_difference is not None:
        print(
            f"checked: loaded back with transformers, its logits on {done.examples} examples are within "
            f"{done.max_logit_difference:.2e} of the trained model's"
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.planning.view import run_plan_command

    return run_plan_command(args)


def cmd_new(args: argparse.Namespace) -> int:
    from launcher.authoring import new_recipe

    path = new_recipe(args.name, args.source, args.dir)
    print(f"wrote {path} (a copy of {args.source}); edit it, then: launcher run {path} --dry-run")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from launcher.environment import quiet_libraries

    quiet_libraries()
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: give at least 1 process")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts}: give 0 (no restart) or more")
    from launcher.job import Job, has_cuda, launch_env
    from launcher.plan import build_plan
    from launcher.recipe import Recipe

    if args.hostfile or args.runner:
        return cmd_run_nodes(args)
    recipe = Recipe.load(args.recipe)
    job = Job(world_size=args.nproc, local_world_size=args.nproc, cuda=has_cuda())
    print(f"{recipe.name}: checking the settings and the data", flush=True)
    from launcher.data.files import scratch_cache

    # A dry run reads and checks the data but keeps nothing of it (datasets' cache goes to a folder it deletes).
    with scratch_cache() if args.dry_run else contextlib.nullcontext():
        plan = build_plan(recipe, args.overrides, launch_env(job))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not job.cuda and args.nproc > cores:
        print(
            f"note: --nproc {args.nproc} on {cores} CPU core(s): the processes share the cores, so each step takes "
            "longer than with fewer processes (fine for trying a multi-process setup)",
            file=sys.stderr,
        )
    if args.dry_run:
        from launcher.launch.commands import render
        from launcher.views import print_dry_run
        from launcher.worker.strategies import dry_run_sections

        path, commands = _rank_commands(plan, args.nproc)
        sections = dry_run_sections(plan.config, args.nproc, job.cuda)
        print_dry_run(plan.to_json(), path, [render(c) for c in commands], args.nproc, sections, _deletes(plan))
        return 0
    from launcher.launch.execute import run_restarting
    from launcher.rundir import claim

    notes = list(plan.notes)
    if args.max_restarts and not plan.config.checkpoint.every_steps:
        notes.append(
            f"--max-restarts {args.max_restarts} with checkpoint.every_steps=0: a restart trains again from step 0; "
            "set checkpoint.every_steps=N to restart from the newest checkpoint"
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    _credentials_for_ranks(plan)
    plan = claim(plan)  # held until this launcher exits; a default directory may get a -2 suffix
    print(f"{recipe.name}: starting {args.nproc} process(es) in {plan.config.output_dir}", flush=True)
    from launcher.hangs import logs_folder

    logs = logs_folder(os.path.abspath(plan.config.output_dir))
    # Each start gets a fresh rendezvous port: the last one's may still be held by its dead ranks' sockets.
    return run_restarting(lambda restart: _rank_commands(plan, args.nproc)[1], args.max_restarts, logs)


def _credentials_for_ranks(plan) -> None:
    """A password in the tracking URI reaches the ranks in their environment (MLflow's own variables, forwarded to
    every node, masked wherever shown), never in the plan they read."""
    from launcher.tracking import credentials_env

    os.environ.update(credentials_env(plan.config.tracking.mlflow_uri))


def _deletes(plan) -> str:
    """What the run would delete in its folder, said by a dry run (a folder the run would refuse is refused here,
    exit 2, as the run would be)."""
    from launcher.rundir import earlier_files

    if not plan.output_dir_given:  # a default name: a taken one is never touched, the next free one is used
        return ""
    deleted = earlier_files(plan.config.output_dir, plan.config)
    if not deleted:
        return ""
    return f"overwrite=true will delete the earlier run's {', '.join(deleted)} in {plan.config.output_dir}"


def cmd_run_nodes(args: argparse.Namespace) -> int:
    """`launcher run --hostfile` / `--runner`: the plan for every node, then the runner's commands."""
    from launcher.job import Job, has_cuda, launch_env
    from launcher.launch.cluster import read_cluster
    from launcher.plan import build_plan
    from launcher.recipe import Recipe

    if args.max_restarts:
        raise ConfigError(f"--max-restarts {args.max_restarts}: restarts are for one node; drop it with --hostfile")
    cluster = read_cluster(
        runner=args.runner,
        hostfile=args.hostfile,
        include=args.include,
        exclude=args.exclude,
        env_names=tuple(args.env),
        env_file=args.env_file,
        ssh_config=args.ssh_config,
        ssh_port=args.ssh_port,
        master_port=args.master_port,
        nproc=args.nproc,
    )
    recipe = Recipe.load(args.recipe)
    job = Job(world_size=cluster.world, local_world_size=cluster.per_node, nodes=len(cluster.hosts), cuda=has_cuda())
    hosts = tuple(h.name for h in cluster.hosts)
    print(f"{recipe.name}: checking the settings and the data", flush=True)
    from launcher.data.files import scratch_cache

    with scratch_cache() if args.dry_run else contextlib.nullcontext():
        plan = build_plan(recipe, args.overrides, launch_env(job, hosts=hosts))
    if args.dry_run:
        from launcher.views import print_dry_run
        from launcher.worker.strategies import dry_run_sections

        path, launch = _node_launch(plan, cluster)
        lines = [c.shown for c in launch.commands]
        if launch.env_file is not None:
            lines.append(f"{launch.environ['DS_ENV_FILE']} (DeepSpeed's env file, secrets masked):")
            lines += [_masked_line(line) for line in launch.env_file.splitlines()]
        sections = dry_run_sections(plan.config, cluster.world, job.cuda)
        print_dry_run(plan.to_json(), path, lines, cluster.world, sections, _deletes(plan))
        return 0
    from launcher.rundir import claim

    if cluster.runner != "slurm" and not args.no_check:
        problem = _preflight(cluster, plan.config.output_dir, cuda=job.cuda)
        if problem is not None:
            return problem
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    _credentials_for_ranks(plan)
    plan = claim(plan)
    where = ", ".join(f"{h.name} ({len(h.slots)})" for h in cluster.hosts)
    print(f"{recipe.name}: starting {cluster.world} process(es) on {where} in {plan.config.output_dir}", flush=True)
    path, launch = _node_launch(plan, cluster)
    if cluster.runner == "ssh":
        from launcher.launch.remote import run_nodes

        return run_nodes(launch.commands)
    from launcher.launch.remote import run_runner

    return run_runner(launch, cluster, path)


def cmd_sbatch(args: argparse.Namespace) -> int:
    """`launcher sbatch`: the plan is checked here (settings, data) for the job's processes, then the batch script
    is written into the run directory, and submitted with --submit."""
    from launcher.environment import quiet_libraries

    quiet_libraries()
    import subprocess

    from launcher.data.files import scratch_cache
    from launcher.files import write_atomic
    from launcher.job import LaunchEnv
    from launcher.launch.sbatch import SCRIPT_NAME, BatchJob, batch_script
    from launcher.overrides import split_override
    from launcher.plan import PLAN_FILE, build_plan
    from launcher.recipe import Recipe

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
    from launcher.tracking import credentials_env

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


def cmd_check(args: argparse.Namespace) -> int:
    from launcher.launch.cluster import read_cluster

    cluster = read_cluster(
        runner="ssh", hostfile=args.hostfile, include=args.include, exclude=args.exclude,
        ssh_config=args.ssh_config, ssh_port=args.ssh_port, master_port=args.master_port,
    )  # fmt: skip
    problem = _preflight(cluster, args.output_dir, cuda=args.gpu, always_show=True)
    return 0 if problem is None else problem


def _preflight(cluster, output_dir: str, *, cuda: bool, always_show: bool = False) -> int | None:
    """Check every host (launch.remote.check_cluster) and judge them (launch.preflight): None when all is well,
    else the exit code, after the table and every problem (255: a host ssh cannot reach; 1: anything else)."""
    from launcher.launch.preflight import judge
    from launcher.launch.remote import check_cluster
    from launcher.views import print_check

    print(f"launcher: checking {len(cluster.hosts)} host(s): ssh, versions, devices, disk, an all-reduce", flush=True)
    reports, allreduce = check_cluster(cluster, os.path.abspath(output_dir))
    rows = judge(cluster.hosts, reports, cuda=cuda)
    problems = [p for row in rows for p in row.problems]
    if isinstance(allreduce, str):
        problems.append(allreduce)
    elif isinstance(allreduce, dict) and not allreduce["right"]:
        problems.append("the all-reduce across the hosts gave a wrong sum")
    if problems or always_show:
        print_check(rows, allreduce, cluster.hosts[0].name)
    if not problems:
        return None
    print("launcher: the hosts are not ready; nothing was started:", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    print("fix those, or leave the hosts out with --exclude (--no-check skips this check)", file=sys.stderr)
    return UNREACHABLE_EXIT_CODE if any(r.report is None for r in rows) else 1


def _node_launch(plan, cluster):
    """(the plan file every node reads, the runner's commands)."""
    import uuid

    from launcher.hangs import logs_folder
    from launcher.launch.cluster import node_commands
    from launcher.plan import PLAN_FILE
    from launcher.rundir import CLAIMED

    folder = os.path.abspath(plan.config.output_dir)
    path = os.path.join(folder, PLAN_FILE)
    cluster = dataclasses.replace(cluster, env={**cluster.env, CLAIMED: folder})
    launch = node_commands(cluster, recipe=plan.recipe, plan_path=path, run_id=uuid.uuid4().hex[:12],
                           logs=logs_folder(folder))  # fmt: skip
    return path, launch


def _masked_line(line: str) -> str:
    from launcher.launch.commands import mask

    name, _, value = line.partition("=")
    return f"  {name}={mask(name, value)}"


def _rank_commands(plan, nproc: int):
    """(the plan file every rank reads, each rank's command)."""
    from launcher.launch.commands import local_commands
    from launcher.net import free_port
    from launcher.plan import PLAN_FILE
    from launcher.rundir import CLAIMED

    folder = os.path.abspath(plan.config.output_dir)
    path = os.path.join(folder, PLAN_FILE)
    commands = local_commands(plan.recipe, path, nproc, free_port())
    # The ranks run in the directory this launcher claimed (and holds): they must not claim it again.
    return path, [dataclasses.replace(c, env={**c.env, CLAIMED: folder}) for c in commands]


if __name__ == "__main__":
    sys.exit(main())

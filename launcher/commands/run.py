"""`launcher run`: a recipe's plan made once, for local processes (`Local`) or for the nodes of a hostfile or an
allocation (`Nodes`), then one path: a dry run shows it, or the run directory is claimed and the ranks start."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import uuid

from launcher.commands.check import preflight
from launcher.data.files import scratch_cache
from launcher.environment import quiet_libraries
from launcher.errors import ConfigError
from launcher.hangs import logs_folder
from launcher.job import Job, LaunchEnv, has_cuda, launch_env
from launcher.launch.cluster import RUNNERS, Cluster, node_commands, read_cluster
from launcher.launch.commands import local_commands, mask, render
from launcher.launch.execute import run_restarting
from launcher.launch.remote import run_nodes, run_runner
from launcher.net import free_port
from launcher.plan import PLAN_FILE, Plan, build_plan
from launcher.recipe import Recipe
from launcher.rundir import CLAIMED, claim, earlier_files
from launcher.tracking import credentials_env
from launcher.views import print_dry_run

NAME, SETTINGS = "run", True

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


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        NAME,
        help="run a recipe on local processes",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="path of the recipe module, e.g. recipes/lora_cls.py")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. strategy=zero2 train.lr=1e-4")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="after a rank fails, start every rank again from the newest checkpoint, up to N times (default 0)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved configuration, the command of each rank and the DeepSpeed JSON; start nothing",
    )
    nodes = parser.add_argument_group("many nodes (hostfiles/README.md)")
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
    return parser


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: give at least 1 process")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts}: give 0 (no restart) or more")
    target = Nodes.of(args) if args.hostfile or args.runner else Local.of(args)
    recipe = Recipe.load(args.recipe)
    print(f"{recipe.name}: checking the settings and the data", flush=True)
    # A dry run reads and checks the data but keeps nothing of it (datasets' cache goes to a folder it deletes).
    with scratch_cache() if args.dry_run else contextlib.nullcontext():
        plan = build_plan(recipe, args.overrides, target.env())
    for warning in target.warnings():
        print(f"note: {warning}", file=sys.stderr)
    if args.dry_run:
        from launcher.worker.strategies import dry_run_sections  # torch: not for --help

        path, lines = target.dry_run_lines(plan)
        sections = dry_run_sections(plan.config, target.job.world_size, target.job.cuda)
        print_dry_run(plan.to_json(), path, lines, target.job.world_size, sections, _deletes(plan))
        return 0
    problem = target.preflight(plan)
    if problem is not None:
        return problem
    for note in [*plan.notes, *target.notes(plan)]:
        print(f"note: {note}", file=sys.stderr)
    # A password in the tracking URI reaches the ranks in their environment (MLflow's own variables, forwarded to
    # every node, masked wherever shown), never in the plan they read.
    os.environ.update(credentials_env(plan.config.tracking.mlflow_uri))
    plan = claim(plan)  # held until this launcher exits; a default directory may get a -2 suffix
    where = target.where()
    print(f"{recipe.name}: starting {target.job.world_size} process(es){where} in {plan.config.output_dir}", flush=True)
    return target.start(plan)


@dataclasses.dataclass
class Local:
    """Processes on this machine, started and watched by this launcher (launch.execute)."""

    job: Job
    max_restarts: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Local:
        return cls(Job(world_size=args.nproc, local_world_size=args.nproc, cuda=has_cuda()), args.max_restarts)

    def env(self) -> LaunchEnv:
        return launch_env(self.job)

    def warnings(self) -> list[str]:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self.job.cuda or self.job.world_size <= cores:
            return []
        return [
            f"--nproc {self.job.world_size} on {cores} CPU core(s): the processes share the cores, so each step "
            "takes longer than with fewer processes (fine for trying a multi-process setup)"
        ]

    def dry_run_lines(self, plan: Plan) -> tuple[str, list[str]]:
        path, commands = self._commands(plan)
        return path, [render(c) for c in commands]

    def preflight(self, plan: Plan) -> int | None:
        return None

    def notes(self, plan: Plan) -> list[str]:
        if self.max_restarts and not plan.config.checkpoint.every_steps:
            return [
                f"--max-restarts {self.max_restarts} with checkpoint.every_steps=0: a restart trains again from step "
                "0; set checkpoint.every_steps=N to restart from the newest checkpoint"
            ]
        return []

    def where(self) -> str:
        return ""

    def start(self, plan: Plan) -> int:
        logs = logs_folder(os.path.abspath(plan.config.output_dir))
        # Each start gets a fresh rendezvous port: the last one's may still be held by its dead ranks' sockets.
        return run_restarting(lambda restart: self._commands(plan)[1], self.max_restarts, logs)

    def _commands(self, plan: Plan):
        """(the plan file every rank reads, each rank's command)."""
        folder = os.path.abspath(plan.config.output_dir)
        path = os.path.join(folder, PLAN_FILE)
        commands = local_commands(plan.recipe, path, self.job.world_size, free_port())
        # The ranks run in the directory this launcher claimed (and holds): they must not claim it again.
        return path, [dataclasses.replace(c, env={**c.env, CLAIMED: folder}) for c in commands]


@dataclasses.dataclass
class Nodes:
    """The nodes of a hostfile (ssh, or DeepSpeed's runner over pdsh) or of this Slurm allocation (srun)."""

    job: Job
    cluster: Cluster
    check: bool

    @classmethod
    def of(cls, args: argparse.Namespace) -> Nodes:
        if args.max_restarts:
            raise ConfigError(f"--max-restarts {args.max_restarts}: restarts are for one node; drop it with --hostfile")
        cluster = read_cluster(
            runner=args.runner, hostfile=args.hostfile, include=args.include, exclude=args.exclude,
            env_names=tuple(args.env), env_file=args.env_file, ssh_config=args.ssh_config, ssh_port=args.ssh_port,
            master_port=args.master_port, nproc=args.nproc,
        )  # fmt: skip
        job = Job(
            world_size=cluster.world, local_world_size=cluster.per_node, nodes=len(cluster.hosts), cuda=has_cuda()
        )
        return cls(job, cluster, check=cluster.runner != "slurm" and not args.no_check)

    def env(self) -> LaunchEnv:
        return launch_env(self.job, hosts=tuple(h.name for h in self.cluster.hosts))

    def warnings(self) -> list[str]:
        return []

    def dry_run_lines(self, plan: Plan) -> tuple[str, list[str]]:
        path, launch = self._launch(plan)
        lines = [c.shown for c in launch.commands]
        if launch.env_file is not None:
            lines.append(f"{launch.environ['DS_ENV_FILE']} (DeepSpeed's env file, secrets masked):")
            for line in launch.env_file.splitlines():
                name, _, value = line.partition("=")
                lines.append(f"  {name}={mask(name, value)}")
        return path, lines

    def preflight(self, plan: Plan) -> int | None:
        return preflight(self.cluster, plan.config.output_dir, cuda=self.job.cuda) if self.check else None

    def notes(self, plan: Plan) -> list[str]:
        return []

    def where(self) -> str:
        return " on " + ", ".join(f"{h.name} ({len(h.slots)})" for h in self.cluster.hosts)

    def start(self, plan: Plan) -> int:
        path, launch = self._launch(plan)
        if self.cluster.runner == "ssh":
            return run_nodes(launch.commands)
        return run_runner(launch, self.cluster, path)

    def _launch(self, plan: Plan):
        """(the plan file every node reads, the runner's commands)."""
        folder = os.path.abspath(plan.config.output_dir)
        path = os.path.join(folder, PLAN_FILE)
        cluster = dataclasses.replace(self.cluster, env={**self.cluster.env, CLAIMED: folder})
        launch = node_commands(
            cluster, recipe=plan.recipe, plan_path=path, run_id=uuid.uuid4().hex[:12], logs=logs_folder(folder)
        )
        return path, launch


def _deletes(plan: Plan) -> str:
    """What the run would delete in its folder, said by a dry run (a folder the run would refuse is refused here,
    exit 2, as the run would be)."""
    if not plan.output_dir_given:  # a default name: a taken one is never touched, the next free one is used
        return ""
    deleted = earlier_files(plan.config.output_dir, plan.config)
    if not deleted:
        return ""
    return f"overwrite=true will delete the earlier run's {', '.join(deleted)} in {plan.config.output_dir}"

"""What a multi-node `launcher run` is given, read and checked once: the hosts (a hostfile and its filters, or a
Slurm allocation), the runner, the environment sent to the nodes and how ssh reaches them; and, from a plan, the
commands that start the nodes (launch/nodes.py builds them). Nothing here starts anything."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from launcher.errors import ConfigError
from launcher.hostfile import Host, parse_hostfile, per_node, select
from launcher.job import HOSTS_VARIABLE
from launcher.launch import nodes

RUNNERS = ("ssh", "deepspeed", "slurm")
ENV_FILE = ".launcher_env"
"""Read from the current directory when --env-file is not given: NAME=VALUE lines every node gets."""
DEFAULT_MASTER_PORT = 29500
"""The rendezvous port on a first host that is not this machine (on this machine: a free port)."""
LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Cluster:
    """The nodes of a launch and how to reach them."""

    runner: str
    """ssh (one torchrun per node over ssh), deepspeed (DeepSpeed's runner over pdsh) or slurm (srun)."""
    hosts: list[Host]
    """The nodes, in node-rank order, each with the local ranks it runs."""
    env: dict[str, str]
    """What every node gets in its environment (the allowlist, --env names, the env file)."""
    hostfile: str | None = None
    """The hostfile given (DeepSpeed's runner reads it itself, with the same filters)."""
    include: str = ""
    exclude: str = ""
    ssh_config: str | None = None
    """An ssh client configuration (ssh -F) to reach the hosts by; None: the user's own."""
    ssh_port: int | None = None
    master_port: int = DEFAULT_MASTER_PORT
    """The rendezvous port on the first host."""
    notes: list[str] = field(default_factory=list)

    @property
    def per_node(self) -> int:
        return len(self.hosts[0].slots)

    @property
    def world(self) -> int:
        return sum(len(h.slots) for h in self.hosts)


def read_cluster(
    *,
    runner: str | None,
    hostfile: str | None,
    include: str = "",
    exclude: str = "",
    env_names: tuple[str, ...] = (),
    env_file: str | None = None,
    ssh_config: str | None = None,
    ssh_port: int | None = None,
    master_port: int | None = None,
    nproc: int = 1,
    environ: Mapping[str, str] | None = None,
) -> Cluster:
    """The launch's cluster from `launcher run`'s options; ConfigError naming each problem (the option, the value,
    the fix)."""
    environ = os.environ if environ is None else environ
    runner = runner or ("slurm" if hostfile is None and "SLURM_JOB_NODELIST" in environ else "ssh")
    if runner not in RUNNERS:
        raise ConfigError(f"--runner {runner}: choose one of {', '.join(RUNNERS)}")
    if hostfile is not None:
        if not os.path.isfile(hostfile):
            raise ConfigError(f"--hostfile {hostfile}: no such file; see hostfiles/README.md for the form")
        with open(hostfile) as f:
            hosts = select(parse_hostfile(f.read(), source=hostfile), include, exclude)
    elif runner == "slurm":
        hosts = [Host(name, tuple(range(nproc))) for name in slurm_hosts(environ)]
    else:
        raise ConfigError(f"--runner {runner} needs --hostfile FILE (the nodes, one 'HOST slots=N' per line)")
    per_node(hosts)
    for name, path in (("--ssh-config", ssh_config), ("--env-file", env_file)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{name} {path}: no such file")
    if runner == "deepspeed" and ssh_config and any(c.isspace() for c in ssh_config):
        raise ConfigError(f"--ssh-config {ssh_config!r}: pdsh splits its ssh options at spaces; use a path without")
    file_env = {}
    env_path = env_file or (ENV_FILE if os.path.isfile(ENV_FILE) else None)
    if env_path is not None:
        with open(env_path) as f:
            file_env = nodes.parse_env_file(f.read(), source=env_path)
    if runner != "deepspeed" and (include or exclude) and hostfile is None:
        raise ConfigError("--include/--exclude filter a hostfile: give --hostfile")
    first_local = hosts[0].name in LOCAL_NAMES or hosts[0].name.startswith("127.") or hosts[0].name == _hostname()
    if master_port is None:
        from launcher.net import free_port

        master_port = free_port() if first_local else DEFAULT_MASTER_PORT
    return Cluster(
        runner=runner,
        hosts=hosts,
        env=nodes.forwarded_env(environ, env_names, file_env),
        hostfile=os.path.abspath(hostfile) if hostfile else None,
        include=include,
        exclude=exclude,
        ssh_config=os.path.abspath(ssh_config) if ssh_config else None,
        ssh_port=ssh_port,
        master_port=master_port,
    )


def slurm_hosts(environ: Mapping[str, str]) -> list[str]:
    """The allocation's nodes, SLURM_JOB_NODELIST expanded by Slurm's own `scontrol show hostnames`."""
    nodelist = environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ConfigError("--runner slurm: SLURM_JOB_NODELIST is not set; run inside an allocation (salloc, sbatch)")
    if shutil.which("scontrol") is None:
        raise ConfigError("--runner slurm: scontrol is not on PATH (it expands SLURM_JOB_NODELIST)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"--runner slurm: scontrol show hostnames {nodelist} failed: {out.stderr.strip()}")
    return out.stdout.split()


def _hostname() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class Launch:
    """What starts the nodes: one command per node (ssh), or one for the whole job (deepspeed, slurm)."""

    commands: list[nodes.NodeCommand]
    env_file: str | None = None
    """DeepSpeed's runner: the env file's text (written next to the plan, read by the runner)."""
    environ: dict[str, str] | None = None
    """DeepSpeed's runner: the environment to start it in (None: this one)."""


def node_commands(cluster: Cluster, *, recipe: str, plan_path: str, run_id: str, logs: str) -> Launch:
    """The commands of `cluster`'s runner for the plan at `plan_path` (every node must see it: a shared file
    system). Every node works in this directory (its path, on the node), with this Python."""
    env = {**cluster.env, "PYTHONUNBUFFERED": "1"}
    if cluster.runner == "ssh":
        commands = nodes.ssh_commands(
            cluster.hosts,
            recipe=recipe,
            plan_path=plan_path,
            cwd=os.getcwd(),
            python=sys.executable,
            rdzv_port=cluster.master_port,
            run_id=run_id,
            env=env,
            log_dir=os.path.join(logs, "torchrun"),
            ssh_port=cluster.ssh_port,
            ssh_config=cluster.ssh_config,
        )
        return Launch(commands)
    if cluster.runner == "slurm":
        return Launch(
            [
                nodes.srun_command(
                    cluster.hosts,
                    recipe=recipe,
                    plan_path=plan_path,
                    python=sys.executable,
                    rdzv_port=cluster.master_port,
                    run_id=run_id,
                    log_dir=os.path.join(logs, "torchrun"),
                )
            ],
            environ={**os.environ, **env},  # srun hands the tasks its own environment
        )
    env_path = os.path.join(os.path.dirname(plan_path), "deepspeed_env")
    env[HOSTS_VARIABLE] = ",".join(h.name for h in cluster.hosts)  # each rank prefixes its lines [host:rank]
    command = nodes.deepspeed_command(
        cluster.hostfile or "",
        cluster.hosts,
        recipe=recipe,
        plan_path=plan_path,
        master_port=cluster.master_port,
        include=cluster.include,
        exclude=cluster.exclude,
        python=sys.executable,
        ssh_port=cluster.ssh_port,
    )
    environ = nodes.deepspeed_runner_environ(os.environ, env_path)
    if cluster.ssh_config:
        environ["PDSH_SSH_ARGS_APPEND"] = f"-F {cluster.ssh_config}"
    return Launch([command], env_file=nodes.deepspeed_env_file(env), environ=environ)

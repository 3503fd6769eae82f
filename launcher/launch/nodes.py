"""Pure builders of a multi-node launch: the environment sent to the other nodes, and what each runner
runs. Nothing here spawns anything. Every value in a generated command is quoted for the shell that reads it, and
each command comes with a rendering for logs and dry runs in which secrets are masked.

Each node reads the run's plan (`--plan`, in the run directory, which every node must see: a shared file system),
so settings never travel on a command line; only the environment does, from an explicit allowlist.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from launcher.errors import ConfigError
from launcher.hostfile import Host, per_node
from launcher.launch.commands import mask

FORWARDED_PREFIXES = ("NCCL_", "CUDA_", "PYTHON", "HF_", "WANDB_", "MLFLOW_")
"""Variable families every node gets (besides those named by the user and those in their env file)."""
DEEPSPEED_EXPORTS = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL", "CUDA")
"""What DeepSpeed's runner exports to pdsh nodes on its own (its EXPORT_ENVS and the CUDA accelerator's)."""
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
"""What torchrun passes on to its ranks: its defaults, and the preemption signals (a checkpoint, then exit 75)."""
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class NodeCommand:
    """What the launcher runs on this machine to start one node (the whole job, for a runner that starts them all)."""

    host: str
    """The node it starts (the first node, for DeepSpeed's runner)."""
    argv: list[str]
    """The command, as given to exec (no shell on this side)."""
    shown: str
    """The command for a log or a dry run: quoted, secrets masked."""


def parse_env_file(text: str, source: str = ".launcher_env") -> dict[str, str]:
    """`NAME=VALUE` lines (comments and blank lines ignored; the value is everything after the first '=', as
    written). Every bad line is reported with its number."""
    out: dict[str, str] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not ENV_NAME.match(name):
            problems.append(f"{source}, line {number}: {raw.strip()!r}: write NAME=VALUE (NAME: letters, digits, _)")
            continue
        out[name] = value
    if problems:
        raise ConfigError(problems)
    return out


def forwarded_env(
    environ: Mapping[str, str], names: tuple[str, ...] = (), env_file: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The variables every node gets: this environment's of the allowlisted families and of `names` (a name not
    set here is refused: a typo would silently forward nothing), then the env file's, which win."""
    missing = [n for n in names if n not in environ]
    if missing:
        raise ConfigError(
            f"--env {', '.join(missing)}: not set in this environment; set it, or put NAME=VALUE in .launcher_env"
        )
    out = {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES) or k in names}
    out.update(env_file or {})
    return dict(sorted(out.items()))


def ssh_commands(
    hosts: list[Host],
    *,
    recipe: str,
    plan_path: str,
    cwd: str,
    python: str,
    rdzv_port: int,
    run_id: str,
    env: Mapping[str, str],
    log_dir: str | None,
    ssh_port: int | None = None,
    ssh_config: str | None = None,
    program: list[str] | None = None,
) -> list[NodeCommand]:
    """One torchrun per node over plain ssh, with c10d rendezvous on the first host, each under the node side
    (`launcher.launch.node`: stopped with everything under it when the launcher's connection ends). Rank lines are
    prefixed `[host:rank]` (by torchrun, with the node side's template) and kept per rank under `log_dir`. The
    remote side's shell reads the command line: every value is quoted there. `program` replaces what torchrun runs
    (default: the recipe with --plan)."""
    out = []
    program = program or [recipe, "--plan", plan_path]
    for host in hosts:
        torchrun = _torchrun(
            python, hosts, len(host.slots), rdzv_port, run_id, program, log_dir=log_dir, local_addr=host.name
        )
        node = [python, "-m", "launcher.launch.node", host.name, "--", *torchrun]
        extra = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, host.slots))} if _some_slots(host) else {}

        def remote(values: Mapping[str, str], node=node, extra=extra) -> str:
            assigns = [f"{k}={shlex.quote(v)}" for k, v in {**values, **extra}.items()]
            return f"cd {shlex.quote(cwd)} && exec env {' '.join(assigns)} {shlex.join(node)}"

        ssh = [
            "ssh",
            *(["-F", ssh_config] if ssh_config else []),
            "-o",
            "BatchMode=yes",
            *(["-p", str(ssh_port)] if ssh_port else []),
            host.name,
        ]
        argv = [*ssh, remote(env)]
        shown = shlex.join([*ssh, remote({k: mask(k, v) for k, v in env.items()})])
        out.append(NodeCommand(host.name, argv, shown))
    return out


def deepspeed_command(
    hostfile: str,
    hosts: list[Host],
    *,
    recipe: str,
    plan_path: str,
    master_port: int,
    include: str = "",
    exclude: str = "",
    python: str = "python",
    ssh_port: int | None = None,
) -> NodeCommand:
    """DeepSpeed's multinode runner over pdsh (`deepspeed`, run as a module of this Python), on the first host's
    address. The environment goes through `deepspeed_env_file`: DeepSpeed forwards only a few variable families on
    its own. Its ssh check is skipped: ours (every host, with the ssh configuration given) runs before."""
    argv = [
        python,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        *([f"--include={include}"] if include else []),
        *([f"--exclude={exclude}"] if exclude else []),
        "--launcher=pdsh",
        "--no_ssh_check",
        *([f"--ssh_port={ssh_port}"] if ssh_port else []),
        f"--master_addr={hosts[0].name}",
        f"--master_port={master_port}",
        recipe,
        "--plan",
        plan_path,
    ]
    return NodeCommand(hosts[0].name, argv, shlex.join(argv))


def deepspeed_env_file(env: Mapping[str, str]) -> str:
    """The file DeepSpeed's runner reads (DS_ENV_FILE) and sends to every node as `export NAME=VALUE; ` in the
    nodes' shell command. DeepSpeed (0.19, `MultiNodeRunner.add_export`) wraps a value holding anything but
    `[\\w@%+=:,./-]` in double quotes, inside which the shell still expands dollars, backquotes and backslashes: so
    each of those and the double quote is written escaped with a backslash here, and reaches the ranks as given. One
    variable per line: a value with a line break cannot be sent this way."""
    broken = [k for k, v in env.items() if "\n" in v or "\r" in v or v != v.strip()]
    if broken:
        raise ConfigError(
            f"{', '.join(broken)}: a value with a line break, or with spaces at an end, cannot be sent through "
            "DeepSpeed's runner (it reads one variable per line and strips each value); change the value, or use "
            "--runner ssh"
        )
    return "".join(f"{k}={_in_double_quotes(v)}\n" for k, v in env.items())


def _in_double_quotes(value: str) -> str:
    return re.sub(r'([\\$`"])', r"\\\1", value)


def deepspeed_runner_environ(environ: Mapping[str, str], env_file_path: str) -> dict[str, str]:
    """The environment to start DeepSpeed's runner in: without the variables it would export to the nodes on its own
    (their values are pasted into a shell command in double quotes only; those we forward come escaped from the env
    file instead), and
    with DS_ENV_FILE naming our file (so that no ~/.deepspeed_env of the user's is read)."""
    kept = {k: v for k, v in environ.items() if not k.startswith(DEEPSPEED_EXPORTS)}
    return {**kept, "DS_ENV_FILE": env_file_path}


def srun_command(
    hosts: list[Host],
    *,
    recipe: str,
    plan_path: str,
    python: str,
    rdzv_port: int,
    run_id: str,
    log_dir: str | None = None,
) -> NodeCommand:
    """Inside a Slurm allocation: one srun task per node, each running torchrun (under the node side, for its
    rank's exit code and prefixes) with c10d rendezvous on the first node; `--kill-on-bad-exit=1` makes Slurm stop
    every task when one fails. srun passes this environment on, and signals to every task."""
    program = [recipe, "--plan", plan_path]
    torchrun = _torchrun(python, hosts, per_node(hosts), rdzv_port, run_id, program, log_dir=log_dir)
    argv = [
        "srun",
        f"--nodes={len(hosts)}",
        "--ntasks-per-node=1",
        f"--nodelist={','.join(h.name for h in hosts)}",
        "--kill-on-bad-exit=1",
        *[python, "-m", "launcher.launch.node", "--no-stdin", "-", "--", *torchrun],
    ]
    return NodeCommand(hosts[0].name, argv, shlex.join(argv))


def _torchrun(
    python: str,
    hosts: list[Host],
    nproc: int,
    rdzv_port: int,
    run_id: str,
    program: list[str],
    log_dir: str | None = None,
    local_addr: str | None = None,
) -> list[str]:
    """torchrun on one node of `hosts`, joining the c10d rendezvous on the first. With `log_dir`, each rank's output
    is also kept there and its lines come prefixed (node.PREFIX_TEMPLATE). c10d numbers the nodes in the order of their
    addresses: `local_addr` (the name the hostfile gives the node) makes that the order of the hosts' names, and is
    the address the other nodes reach it by when it holds rank 0."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={len(hosts)}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={hosts[0].name}:{rdzv_port}",
        f"--rdzv_id={run_id}",
        *([f"--local-addr={local_addr}"] if local_addr else []),
        *([f"--log-dir={log_dir}", "--tee=3"] if log_dir else []),
        f"--signals-to-handle={','.join(TORCHRUN_SIGNALS)}",
        *program,
    ]


def _some_slots(host: Host) -> bool:
    """Whether a filter left the host only some of its slots (then its processes see only those devices)."""
    return host.slots != tuple(range(len(host.slots)))

"""What a process can see of the job it runs in, read in this one place: the rank variables that `launcher run`,
torchrun or DeepSpeed's runner set (none for a plain `python recipe.py`), and the devices of this machine.
Everything else takes launch facts from a `Job` or from the plan."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

HOSTS_VARIABLE = "LAUNCHER_HOSTS"
"""The nodes of a launch through DeepSpeed's runner, comma-separated in node-rank order (its ranks prefix their
lines with their host: worker/prefix.py)."""


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """What the job can see of where it runs."""

    world_size: int = 1
    """Processes in the job."""
    local_world_size: int = 1
    """Processes on this node."""
    deepspeed_runner: bool = False
    """Started by DeepSpeed's own runner (`deepspeed ...`), which appends --local_rank."""
    cuda: bool = False
    """CUDA devices are present."""
    gpus: int = 0
    """CUDA devices on this machine."""
    bf16_supported: bool = False
    """The devices compute bf16 natively."""
    libaio: bool = False
    """libaio is installed (DeepSpeed's asynchronous NVMe I/O needs it)."""
    now: float | None = None
    """Wall-clock time used for the default run directory name (None: the current time)."""
    elastic_shared_store: bool = False
    """Started by torchrun with --max-restarts and its rendezvous store shared with the ranks (Job)."""
    hosts: tuple[str, ...] = ()
    """The nodes of a multi-node launch, in node-rank order (empty: this machine alone)."""
    gpu_memory: int = 0
    """Bytes of memory of one GPU (0: no GPU, or unknown): strategy=auto plans by it."""
    host_memory: int = 0
    """Bytes of this machine's memory (0: unknown)."""

    @property
    def auto_precision(self) -> str:
        """What precision=auto is here: bf16 where the GPUs compute it natively; else fp32 (fp16 is never chosen
        for the user: it needs loss scaling, and overflows where bf16 does not)."""
        return "bf16" if self.cuda and self.bf16_supported else "fp32"


@dataclass(frozen=True, kw_only=True)
class Job:
    """One process's view of its job."""

    rank: int = 0
    """Global rank (RANK)."""
    local_rank: int = 0
    """Rank on this node (LOCAL_RANK): the GPU it uses."""
    world_size: int = 1
    """Processes in the job (WORLD_SIZE)."""
    local_world_size: int = 1
    """Processes on this node (LOCAL_WORLD_SIZE from torchrun and ours, LOCAL_SIZE from DeepSpeed's runner)."""
    nodes: int = 1
    """Nodes in the job (GROUP_WORLD_SIZE from torchrun, CROSS_SIZE from DeepSpeed's runner, else the processes
    over those per node)."""
    cuda: bool = False
    """This process sees CUDA devices."""
    restart: int = 0
    """Times the job was started again after a failure: LAUNCHER_RESTART (launcher run --max-restarts) or
    TORCHELASTIC_RESTART_COUNT (torchrun --max-restarts)."""
    restart_reason: str = ""
    """What ended the previous start (LAUNCHER_RESTART_REASON, from launcher run)."""
    elastic_shared_store: bool = False
    """torchrun may restart the job (TORCHELASTIC_MAX_RESTARTS > 0) and shares its rendezvous store with the ranks
    (TORCHELASTIC_USE_AGENT_STORE=True)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_kind(self) -> str:
        return "cuda" if self.cuda else "cpu"


def job_from_environ(environ: Mapping[str, str] | None = None, *, cuda: bool | None = None) -> Job:
    """The Job described by the rank variables in `environ` (default: this process's); a job of one without them."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
    return Job(
        rank=rank,
        local_rank=int(env.get("LOCAL_RANK", str(rank))),
        world_size=world,
        local_world_size=local_world,
        nodes=int(env.get("GROUP_WORLD_SIZE") or env.get("CROSS_SIZE") or max(1, world // max(1, local_world))),
        cuda=has_cuda() if cuda is None else cuda,
        restart=int(env.get("LAUNCHER_RESTART") or env.get("TORCHELASTIC_RESTART_COUNT") or 0),
        restart_reason=env.get("LAUNCHER_RESTART_REASON", ""),
        elastic_shared_store=int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0
        and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_env(job: Job, *, deepspeed_runner: bool = False, hosts: tuple[str, ...] = ()) -> LaunchEnv:
    """What this machine offers `job` (the input of `plan.build_plan`), probing the devices and libraries."""
    import ctypes.util

    import torch

    return LaunchEnv(
        world_size=job.world_size,
        local_world_size=job.local_world_size,
        deepspeed_runner=deepspeed_runner,
        hosts=hosts,
        elastic_shared_store=job.elastic_shared_store,
        cuda=job.cuda,
        gpus=torch.cuda.device_count() if job.cuda else 0,
        bf16_supported=job.cuda and torch.cuda.is_bf16_supported(),
        gpu_memory=torch.cuda.get_device_properties(0).total_memory if job.cuda else 0,
        host_memory=_host_memory(),
        # DeepSpeed's NVMe offload does its I/O through libaio; without the library its aio op cannot build.
        libaio=ctypes.util.find_library("aio") is not None,
    )


def _host_memory() -> int:
    return meminfo_bytes("MemTotal")


def meminfo_bytes(key: str) -> int:
    """A /proc/meminfo field (MemTotal, MemAvailable) in bytes (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

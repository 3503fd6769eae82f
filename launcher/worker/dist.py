"""The process group: rank/world from the launcher's environment, gloo on CPU and nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from launcher.net import free_port


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_environ(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as set by torchrun, DeepSpeed's runner or our executor; 1 process otherwise."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", str(rank)))
    return rank, local, world


def launch_env(world_size: int, *, deepspeed_runner: bool = False):
    """What this machine offers the job (the input of `plan.resolve`)."""
    import ctypes.util

    from launcher.plan import LaunchEnv

    cuda = torch.cuda.is_available()
    return LaunchEnv(
        world_size=world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        deepspeed_runner=deepspeed_runner,
        cuda=cuda,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        # DeepSpeed's NVMe offload does its I/O through libaio; without the library its aio op cannot build.
        libaio=ctypes.util.find_library("aio") is not None,
    )


def init() -> Ranks:
    """Join (or create, for a single process) the default process group."""
    rank, local, world = ranks_from_environ()
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain `python recipe.py`: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Ranks(rank=rank, local_rank=local, world_size=world, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

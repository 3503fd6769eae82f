"""The process group of a Job: gloo on CPU and nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from launcher.job import Job, job_from_environ
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


def init(job: Job | None = None) -> Ranks:
    """Join (or create, for a single process) the default process group; `job` defaults to this process's."""
    job = job or job_from_environ()
    if job.cuda:
        device = torch.device("cuda", job.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain `python recipe.py`: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend=backend, rank=job.rank, world_size=job.world_size)
    return Ranks(rank=job.rank, local_rank=job.local_rank, world_size=job.world_size, device=device)


def shutdown() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


_host_group = None


def any_rank(flag: int) -> int:
    """The largest of every rank's `flag` (a host value: a stop request), reduced on the host: over the default group
    under gloo, over a gloo group of the same ranks under nccl (a nccl reduction would make the host wait for the
    device's queued work). Collective."""
    global _host_group
    if dist.get_world_size() == 1:
        return flag
    if dist.get_backend() != "gloo" and _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    t = torch.tensor([flag], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group if dist.get_backend() != "gloo" else None)
    return int(t[0])


def gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

"""The all-reduce of `launcher check`, one process per host under torchrun: SIZE_MB of fp32 summed across every
host a few times (gloo on CPU, nccl on GPU); rank 0 prints ALLREDUCE_MARK + JSON: the bus bandwidth (the
nccl-tests convention, 2 (n-1)/n x bytes / seconds), the time of one all-reduce, and whether the sum was right."""

from __future__ import annotations

import json
import os
import time

ALLREDUCE_MARK = "@launcher-allreduce "
SIZE_MB = 32
ROUNDS = 5


def main() -> None:
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    device = "cuda" if cuda else "cpu"
    x = torch.ones(SIZE_MB * 2**20 // 4, device=device)
    dist.all_reduce(x)  # a first one sets the connections up
    right = bool((x == world).all())
    start = time.perf_counter()
    for _ in range(ROUNDS):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / ROUNDS
    if dist.get_rank() == 0:
        bus = 2 * (world - 1) / world * x.numel() * 4 / seconds if world > 1 else 0.0
        result = {"backend": dist.get_backend(), "world": world, "mb": SIZE_MB, "seconds": seconds,
                  "bus_gb_s": bus / 1e9, "right": right}  # fmt: skip
        print(ALLREDUCE_MARK + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Which examples each rank trains on, step by step: seeded, length-grouped, resumable.

Every rank computes the same global order from (seed, epoch) and takes its slice of each global batch, so no
rank needs to talk to another. A global batch is one optimizer step's examples (micro-batch x processes x
accumulation): a job resumed on another number of processes, with the accumulation that keeps that batch, trains
the very same examples in each step. With length grouping, examples of similar length share a global batch (little
padding within a rank's micro-batch, similar work on every rank in the same step), while the order of the
batches stays random. The state is (epoch, batches done), so a run can continue where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

# Examples are sorted by length within windows of this many global batches: larger groups pad less but make
# batch composition less random (the trade-off HF's LengthGroupedSampler makes with the same factor).
MEGABATCH = 50


def global_batches(
    n: int, batch: int, *, seed: int, epoch: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """The epoch's global batches of `batch` indices each. The last one is completed with indices from the start
    of the order (as torch's DistributedSampler pads), so every rank runs the same number of steps."""
    if n <= 0:
        return []
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / batch) * batch
    order += (order * math.ceil(total / n))[: total - n]
    if lengths is None:
        return [order[i : i + batch] for i in range(0, total, batch)]
    window = batch * MEGABATCH
    batches = []
    for start in range(0, total, window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    # Shuffle the batches, but run the longest first: an out-of-memory then shows at step 1, not hours in.
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    rest = [b for k, b in enumerate(batches) if k != longest]
    perm = torch.randperm(len(rest), generator=g).tolist()
    return [batches[longest]] + [rest[k] for k in perm]


def repeats(batches: list[list[int]]) -> set[tuple[int, int]]:
    """(batch, position) of every example's second appearance in an epoch: the rows that complete the last batch.
    Every rank computes the same set, so the job's sample count is each example once."""
    seen: set[int] = set()
    out = set()
    for b, batch in enumerate(batches):
        for k, i in enumerate(batch):
            if i in seen:
                out.add((b, k))
            seen.add(i)
    return out


class DistributedBatchSampler:
    """This rank's micro-batches (lists of indices) for one epoch; a DataLoader `batch_sampler`."""

    def __init__(
        self,
        size: int,
        micro_batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        mark_repeats: bool = False,
        grad_accum: int = 1,
    ):
        self.size, self.micro, self.rank, self.world, self.seed = size, micro_batch_size, rank, world_size, seed
        self.accum = grad_accum
        """Micro-batches per optimizer step: each global batch gives this rank that many, in order."""
        self.lengths = lengths
        self.mark_repeats = mark_repeats
        """Yield `i + size` for an example that completes the epoch's last batch a second time (see repeats())."""
        self.epoch = 0
        self.skip = 0
        """Micro-batches of the current epoch already trained (resume)."""

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def state_dict(self, batches_done: int) -> dict[str, int]:
        """Where training stands: the epoch and how many of this epoch's micro-batches each rank has trained."""
        return {"epoch": self.epoch, "batches_done": batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.skip, self.seed = state["epoch"], state["batches_done"], state["seed"]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro * self.world * self.accum
        batches = global_batches(self.size, step, seed=self.seed, epoch=self.epoch, lengths=self.lengths)
        repeated = repeats(batches) if self.mark_repeats else set()
        for b in range(self.skip // self.accum, len(batches)):
            for j in range(self.accum):
                if b * self.accum + j < self.skip:
                    continue
                # Micro-batch j of every rank, then j + 1: consecutive slices of the step's examples.
                lo = (j * self.world + self.rank) * self.micro
                part = batches[b][lo : lo + self.micro]
                yield [i + self.size if (b, lo + k) in repeated else i for k, i in enumerate(part)]

    def __len__(self) -> int:
        """Micro-batches in a whole epoch (a resumed epoch yields `skip` fewer)."""
        return math.ceil(self.size / (self.micro * self.world * self.accum)) * self.accum

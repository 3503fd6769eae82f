"""Each step's figures held on the device until the loop reads them, once per logged interval.

Reading a device value (`.item()`, `float(t)`) makes the host wait for the device; doing it once a step would leave
the GPU idle while the host queues the next step's work. The loop adds each step here and reads every step since the
last read with one all-reduce and one copy to the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from launcher.worker.strategies.base import StepResult


@dataclass(frozen=True)
class StepFigures:
    """One optimizer step, as the whole job saw it."""

    step: int
    epoch: int
    loss: float
    """Mean over ranks of each rank's mean micro-batch loss."""
    grad_norm: float | None
    lr: float
    samples: float
    """Examples trained by all ranks (a repeat completing the last batch counted once)."""
    tokens: float
    """Real (non-padding) tokens of all ranks."""
    skipped: bool
    """fp16's loss scaler skipped the step."""


class _Queued(NamedTuple):
    """What the host knows of a queued step without reading the device."""

    step: int
    epoch: int
    lr: float
    samples: float
    tokens: float
    skipped: bool
    has_norm: bool


class Pending:
    """Steps added since the last read, and the wall time since then (the clock restarts after a read, and after
    what the loop does between steps that is not training: evaluation, checkpoints)."""

    def __init__(self, device: torch.device, world_size: int):
        self.device = device
        self.world_size = world_size
        self._device_rows: list[torch.Tensor] = []
        self._host_rows: list[_Queued] = []
        self.restart_clock()

    def __len__(self) -> int:
        return len(self._host_rows)

    def restart_clock(self) -> None:
        self._t0 = time.perf_counter()

    def add(self, step: int, epoch: int, result: StepResult, samples: float, tokens: float) -> None:
        """Queue a step: its loss and norm stay on the device (stacking them queues work, it reads nothing)."""
        norm = result.grad_norm
        loss = result.loss.detach().to(self.device, torch.float64)
        norm_t = norm.detach().to(self.device, torch.float64) if norm is not None else torch.zeros_like(loss)
        self._device_rows.append(torch.stack([loss.reshape(()), norm_t.reshape(())]))
        self._host_rows.append(
            _Queued(step, epoch, result.lr, float(samples), float(tokens), result.skipped, norm is not None)
        )

    def read(self) -> tuple[list[StepFigures], float]:
        """The queued steps as the job saw them (one all-reduce, one device-to-host copy) and the wall seconds they
        took; empties the queue and restarts the clock. Collective: every rank reads at the same steps."""
        if not self._host_rows:
            return [], 0.0
        counts = torch.tensor([[r.samples, r.tokens] for r in self._host_rows], dtype=torch.float64)
        stats = torch.cat([torch.stack(self._device_rows), counts.to(self.device)], dim=1)
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.all_reduce(stats)
        values = stats.tolist()  # the one host sync of the interval
        seconds = time.perf_counter() - self._t0
        n = self.world_size
        figures = [
            StepFigures(
                step=row.step,
                epoch=row.epoch,
                loss=loss / n,
                grad_norm=norm / n if row.has_norm else None,
                lr=row.lr,
                samples=samples,
                tokens=tokens,
                skipped=row.skipped,
            )
            for row, (loss, norm, samples, tokens) in zip(self._host_rows, values, strict=True)
        ]
        self._device_rows, self._host_rows = [], []
        self.restart_clock()
        return figures, seconds

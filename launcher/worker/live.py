"""Rank 0's live view of training: what a person watching a run wants at a glance.

On a terminal it is a panel under the progress bar, redrawn as steps end; anywhere else (CI, a Slurm log, a pipe)
one plain line per logged step, which a log keeps readable. Pure: the figures come in a Snapshot (RunLog fills it),
the renderers only format them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
"""Dense bf16 tensor-core peaks (NVIDIA's datasheets, without 2:4 sparsity), matched in this order against
torch.cuda.get_device_name: the first name it contains. H100 means the SXM part."""


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, None for one the table does not know (no MFU is shown then)."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_name), None)


def mfu(flops_per_token: float, tokens_per_s: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation: the model FLOPs the job did per second (flops_per_token x all ranks' tokens/s)
    over the job's peak (world size x one GPU's peak, TFLOP/s)."""
    return flops_per_token * tokens_per_s / (world_size * peak * 1e12)


@dataclass
class Smoothed:
    """An exponential moving average, bias-corrected (Adam's way): its first value is the first sample, not a
    fraction of it."""

    beta: float = 0.9
    _mean: float = 0.0
    _count: int = 0

    def add(self, value: float) -> float:
        if math.isfinite(value):
            self._mean = self.beta * self._mean + (1 - self.beta) * value
            self._count += 1
        return self.value

    @property
    def value(self) -> float:
        return self._mean / (1 - self.beta**self._count) if self._count else math.nan


@dataclass
class Snapshot:
    """The run as of its last read step."""

    step: int
    total: int
    epoch: int
    """0-based, as the loop counts."""
    epochs: int | None
    """Passes the run makes (None when max_steps decides)."""
    loss: float
    """This step's loss (all ranks' mean)."""
    smoothed_loss: float
    lr: float
    samples_per_s: float
    tokens_per_s: float
    eta_s: float | None
    memory: str
    """This rank's memory, as words: "GPU 12.1 GiB allocated, 14.0 GiB reserved" or "RSS 1.2 GiB"."""
    mfu: float | None = None
    eval: dict[str, float] = field(default_factory=dict)
    """The last evaluation's metrics, with eval_step."""
    eval_step: int | None = None
    checkpoint_age_s: float | None = None
    """Seconds since the last checkpoint was written (None: none yet)."""


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fields(s: Snapshot) -> list[tuple[str, str]]:
    """(name, text) of every figure the snapshot has, in the order the views show them."""
    rows = [
        ("step", f"{s.step}/{s.total}"),
        ("epoch", f"{s.epoch + 1}/{s.epochs}" if s.epochs else f"{s.epoch + 1}"),
        ("loss", f"{s.loss:.4f} (smoothed {s.smoothed_loss:.4f})"),
        ("lr", f"{s.lr:.2e}"),
        ("throughput", f"{s.samples_per_s:.1f} samples/s, {s.tokens_per_s:,.0f} tokens/s"),
    ]
    if s.mfu is not None:
        rows.append(("MFU", f"{100 * s.mfu:.1f}%"))
    if s.eta_s is not None:
        rows.append(("ETA", duration(s.eta_s)))
    rows.append(("memory", s.memory))
    if s.eval:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in s.eval.items())
        rows.append(("eval", f"{shown} (step {s.eval_step})"))
    rows.append(("checkpoint", "none yet" if s.checkpoint_age_s is None else f"{duration(s.checkpoint_age_s)} ago"))
    return rows


def plain_line(s: Snapshot) -> str:
    """One line for logs that are not a terminal; it starts as the progress bar's figures do."""
    parts = [
        f"step {s.step}/{s.total}",
        f"loss {s.loss:.4f}",
        f"lr {s.lr:.2e}",
        f"{s.samples_per_s:.1f} samples/s",
        f"{s.tokens_per_s:,.0f} tokens/s",
        f"smoothed loss {s.smoothed_loss:.4f}",
        f"epoch {s.epoch + 1}" + (f"/{s.epochs}" if s.epochs else ""),
    ]
    if s.mfu is not None:
        parts.append(f"MFU {100 * s.mfu:.1f}%")
    if s.eta_s is not None:
        parts.append(f"ETA {duration(s.eta_s)}")
    parts.append(s.memory)
    if s.eval:
        parts.append("last eval " + " ".join(f"{k} {v:.4f}" for k, v in s.eval.items()))
    if s.checkpoint_age_s is not None:
        parts.append(f"checkpoint {duration(s.checkpoint_age_s)} ago")
    return "  ".join(parts)


def panel(s: Snapshot):
    """The terminal form: a two-column table of `fields` (rich)."""
    from rich.table import Table

    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold cyan")
    t.add_column()
    for name, text in fields(s):
        t.add_row(name, text)
    return t

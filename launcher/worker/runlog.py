"""Rank 0's view of a run: rich progress, metrics.jsonl, TensorBoard and the start/end summaries.

Other ranks get an inactive RunLog that does nothing, so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from launcher.files import write_atomic


class RunLog:
    def __init__(self, out_dir: str, *, active: bool, total_steps: int, log_every: int, resumed_at: int | None = None):
        """`resumed_at`: the step of the checkpoint a resumed run continues from; it adds to that run's metrics,
        dropping those of later steps (a run that died after its checkpoint trains them again)."""
        self.active = active
        self.total_steps = total_steps
        self.log_every = log_every
        self.console = Console(stderr=False, highlight=False)
        self._progress: Progress | None = None
        self._jsonl = None
        self._tb = None
        self.t0 = time.time()
        self._samples = self._seconds = self._tokens = 0.0
        if not active:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        if resumed_at is not None:
            _keep_until(path, resumed_at)
        self._jsonl = open(path, "a" if resumed_at is not None else "w", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    # ------------------------------------------------------------------ summaries
    def table(self, title: str, rows: list[tuple[str, Any]]) -> None:
        if not self.active:
            return
        t = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
        t.add_column(style="bold cyan")
        t.add_column()
        for key, value in rows:
            t.add_row(key, str(value))
        self.console.print(t)

    # ------------------------------------------------------------------ progress
    def begin(self, done: int = 0) -> None:
        """Start the progress bar, `done` steps already trained (a resumed run)."""
        if not self.active or not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._progress.start()
        # Nothing to show before the first step ends (not "loss nan lr 0.00e+00").
        self._task = self._progress.add_task("train", total=self.total_steps, completed=done, stats="first step...")

    def tick(self, step: int) -> None:
        """A step ended (its figures are read later, with its interval's): move the bar on."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def step(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float | None,
        samples: float,
        seconds: float,
        epoch: int,
        tokens: float = 0.0,
    ) -> None:
        """Record one optimizer step; throughput is averaged over the steps since the last written line."""
        if not self.active:
            return
        self._samples += samples
        self._seconds += seconds
        self._tokens += tokens
        samples_per_s = self._samples / self._seconds if self._seconds else 0.0
        if self._progress is not None:
            stats = f"loss {loss:.4f}  lr {lr:.2e}  {samples_per_s:.1f} samples/s"
            self._progress.update(self._task, completed=step, stats=stats)
        if step % self.log_every and step != self.total_steps:
            return
        record = {
            "step": step,
            "split": "train",
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "samples_per_s": samples_per_s,
            "tokens_per_s": self._tokens / self._seconds if self._seconds else 0.0,
            **({"grad_norm": grad_norm} if grad_norm is not None else {}),
            "time": round(time.time() - self.t0, 3),
        }
        self._write(record)
        self._samples = self._seconds = self._tokens = 0.0
        if self._progress is None:
            self.console.print(
                f"step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.2e}  {samples_per_s:.1f} samples/s"
            )

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self._write({"step": step, "split": "eval", **metrics, "time": round(time.time() - self.t0, 3)})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.console.print(f"[bold green]eval[/] step {step}  {shown}")

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """A line of the run log that is not a metric (a restart, say), on screen and in metrics.jsonl."""
        if not self.active:
            return
        self._jsonl.write(json.dumps({"step": step, "split": kind, **fields}) + "\n")

    def _write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        split = record["split"]
        for key, value in record.items():
            if key not in ("step", "split", "epoch", "time") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, record["step"])

    def end_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self.end_progress()
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = self._tb = None


def _keep_until(path: str, step: int) -> None:
    """Drop the records of steps after `step` from a metrics file, atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    write_atomic(path, "".join(lines))

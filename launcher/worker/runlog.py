"""Rank 0's view of a run: rich progress, metrics.jsonl, TensorBoard and the start/end summaries.

Other ranks get an inactive RunLog that does nothing, so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from launcher.console import make_console
from launcher.files import write_atomic
from launcher.worker import live
from launcher.worker.memory import rss_mib


def host_memory() -> str:
    """This process's resident memory, as the live view shows it on CPU ranks."""
    return f"RSS {rss_mib()[0] / 1024:.2f} GiB"


class _LiveProgress(Progress):
    """The progress bar with the live view's panel under it (rich redraws both together)."""

    snapshot: live.Snapshot | None = None

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        if self.snapshot is not None:
            yield live.panel(self.snapshot)


class RunLog:
    def __init__(
        self,
        out_dir: str,
        *,
        active: bool,
        total_steps: int,
        log_every: int,
        resumed_at: int | None = None,
        epochs: int | None = None,
        memory: Callable[[], str] = host_memory,
        flops_per_token: float | None = None,
        peak_tflops: float | None = None,
        world_size: int = 1,
        trackers: list | None = None,
    ):
        """`resumed_at`: the step of the checkpoint a resumed run continues from; it adds to that run's metrics,
        dropping those of later steps (a run that died after its checkpoint trains them again). `epochs`: the
        passes the run makes (None when max_steps decides); `memory`: this rank's memory in words; MFU is shown
        when both `flops_per_token` (model FLOPs) and the GPU's `peak_tflops` are known. `trackers`
        (worker.trackers) get every series TensorBoard gets."""
        self.active = active
        self.total_steps = total_steps
        self.log_every = log_every
        self.epochs = epochs
        self.memory = memory
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.world_size = world_size
        self.trackers = list(trackers or [])
        self.console = make_console()
        self._progress: _LiveProgress | None = None
        self._jsonl = None
        self._tb = None
        self.t0 = time.time()
        self._samples = self._seconds = self._tokens = 0.0
        self._smoothed = live.Smoothed()
        self._run_steps, self._run_seconds = 0, 0.0  # this process's steps, for the ETA
        self._eval: dict[str, float] = {}
        self._eval_step: int | None = None
        self._checkpoint_time: float | None = None
        self.snapshot: live.Snapshot | None = None
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
        self._progress = _LiveProgress(
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
        self._run_steps += 1
        self._run_seconds += seconds
        samples_per_s = self._samples / self._seconds if self._seconds else 0.0
        tokens_per_s = self._tokens / self._seconds if self._seconds else 0.0
        self.snapshot = self._snapshot(step, epoch, loss, lr, samples_per_s, tokens_per_s)
        if self._progress is not None:
            stats = f"loss {loss:.4f}  lr {lr:.2e}  {samples_per_s:.1f} samples/s"
            self._progress.snapshot = self.snapshot
            self._progress.update(self._task, completed=step, stats=stats)
        if step % self.log_every and step != self.total_steps:
            return
        record = {
            "step": step,
            "split": "train",
            "epoch": epoch + 1,  # counted from 1, as the console says it
            "loss": loss,
            "lr": lr,
            "samples_per_s": samples_per_s,
            "tokens_per_s": tokens_per_s,
            **({"grad_norm": grad_norm} if grad_norm is not None else {}),
            **({"mfu": self.snapshot.mfu} if self.snapshot.mfu is not None else {}),
            "rss_mib": round(rss_mib()[0], 1),  # rank 0's, for the report's memory over steps
            "time": round(time.time() - self.t0, 3),
        }
        self._write(record)
        self._samples = self._seconds = self._tokens = 0.0
        if self._progress is None:
            self.console.print(live.plain_line(self.snapshot))

    def _snapshot(self, step, epoch, loss, lr, samples_per_s, tokens_per_s) -> live.Snapshot:
        per_step = self._run_seconds / self._run_steps if self._run_steps else None
        known = self.flops_per_token is not None and self.peak_tflops is not None
        return live.Snapshot(
            step=step,
            total=self.total_steps,
            epoch=epoch,
            epochs=self.epochs,
            loss=loss,
            smoothed_loss=self._smoothed.add(loss),
            lr=lr,
            samples_per_s=samples_per_s,
            tokens_per_s=tokens_per_s,
            eta_s=None if per_step is None else per_step * max(self.total_steps - step, 0),
            memory=self.memory(),
            mfu=live.mfu(self.flops_per_token, tokens_per_s, self.world_size, self.peak_tflops) if known else None,
            eval=dict(self._eval),
            eval_step=self._eval_step,
            checkpoint_age_s=None if self._checkpoint_time is None else time.time() - self._checkpoint_time,
        )

    def checkpointed(self) -> None:
        """A checkpoint was just written (the live view shows its age)."""
        self._checkpoint_time = time.time()

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self._eval, self._eval_step = dict(metrics), step
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
        values = {
            f"{split}/{key}": value
            for key, value in record.items()
            if key not in ("step", "split", "epoch", "time") and isinstance(value, (int, float))
        }
        for tag, value in values.items():
            self._tb.add_scalar(tag, value, record["step"])
        for tracker in self.trackers:
            tracker.log(values, record["step"])

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
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _keep_until(path: str, step: int) -> None:
    """Drop the records of steps after `step` from a metrics file, atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    write_atomic(path, "".join(lines))

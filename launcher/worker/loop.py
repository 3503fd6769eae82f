"""The one training loop: batches -> engine -> metrics. It never asks which strategy is running."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from launcher.config import RunConfig
from launcher.data import EvalShard
from launcher.data.sampling import DistributedBatchSampler
from launcher.errors import REQUEUE_EXIT_CODE, Preempted, TrainingStopped
from launcher.selection import Selection
from launcher.signals import signal_name
from launcher.task import Task
from launcher.worker import dist
from launcher.worker.checkpoint import Position
from launcher.worker.figures import Pending, StepFigures
from launcher.worker.preempt import stop_requests
from launcher.worker.runlog import RunLog
from launcher.worker.strategies.base import Engine
from launcher.worker.watchdog import beat, beating


def train_loader(task: Task, cfg: RunConfig, ranks: dist.Ranks) -> DataLoader:
    """The rank's training batches; on a GPU collated ahead by worker processes into pinned memory, so the step does
    not wait for them and their copy to the device overlaps compute (to_device's non_blocking)."""
    sampler = DistributedBatchSampler(
        len(task.train),
        cfg.train.micro_batch_size,
        rank=ranks.rank,
        world_size=ranks.world_size,
        seed=cfg.seed,
        lengths=task.lengths if cfg.data.group_by_length else None,
        mark_repeats=True,
        grad_accum=cfg.train.grad_accum,
    )
    # A generator of its own: each epoch's iterator would otherwise draw its seed from the global one, which a
    # resumed run restores from its checkpoint, and the resumed run's dropout would differ from the original's.
    cuda = ranks.device.type == "cuda"
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else (2 if cuda else 0)
    return DataLoader(
        _Marked(task.train),
        batch_sampler=sampler,
        collate_fn=_Collate(task.collate, task.count_tokens or real_tokens),
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
    )


class _Marked:
    """The training set seen through a sampler that marks repeats: index i + len is example i again."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        n = len(self.rows)
        return self.rows[j % n], j < n


class _Collate:
    """(the recipe's batch, how many of its examples are not repeats, its real tokens): throughput counts each
    example once. Counted here, on the host's batch (in a loader worker on GPUs), not on the device's copy."""

    def __init__(self, collate, count_tokens):
        self.collate = collate
        self.count_tokens = count_tokens

    def __call__(self, items):
        batch = self.collate([row for row, _ in items])
        return batch, sum(fresh for _, fresh in items), self.count_tokens(batch)


def total_steps(loader: DataLoader, cfg: RunConfig) -> int:
    per_epoch = max(1, len(loader) // cfg.train.grad_accum)
    return cfg.train.max_steps or cfg.train.epochs * per_epoch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def groups(loader: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of `size` micro-batches, one optimizer step each (the sampler gives whole steps: it
    completes an epoch's last global batch; an incomplete group would be dropped)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def train(
    engine: Engine,
    task: Task,
    recipe,
    cfg: RunConfig,
    ranks: dist.Ranks,
    log: RunLog,
    loader: DataLoader,
    *,
    start: Position | None = None,
    save: Callable[[Position], str] | None = None,
    evals: Evaluations | None = None,
) -> dict:
    """Train to the plan's last step, from `start` (a resumed checkpoint's position) or from the beginning;
    `save(position)` writes a checkpoint every checkpoint.every_steps steps and after the last. A stop signal to
    any rank (worker.preempt) ends training after the step under way on every rank, with a checkpoint of it:
    errors.Preempted. The step's figures are read once per logged interval (worker.figures), not once a step.
    `evals` follows the evaluations every train.eval_every steps: the best one (a checkpoint of it for
    checkpoint.keep_best) and early stopping. The engine's step hooks hear of each optimizer step (AdaLoRA's budget
    prunes there)."""
    total = total_steps(loader, cfg)
    evals = evals or Evaluations()
    step, epoch = 0, 0
    sampler = loader.batch_sampler
    if start is not None:
        step, epoch = start.step, start.epoch
        sampler.load_state_dict({"epoch": epoch, "batches_done": start.batches_done, "seed": sampler.seed})
    if cfg.train.eval_at_start and task.eval is not None and start is None:
        log.eval(0, evaluate(engine, task, recipe, cfg, ranks)[0])  # a baseline, not a candidate for the best
    every = cfg.checkpoint.every_steps
    totals = _Totals(first_step=start.step + 1 if start is not None else 1)
    engine.train(True)
    log.begin(step)
    beat(step, "training")  # the watchdog counts from here (a resumed run: from its checkpoint's step)
    pending = Pending(engine.device, ranks.world_size)
    with stop_requests() as requests:
        while step < total:
            sampler.set_epoch(epoch)
            done = sampler.skip  # micro-batches of this epoch trained before (a resumed epoch)
            for micro in groups(loader, cfg.train.grad_accum):
                done += len(micro)
                samples = sum(fresh for _, fresh, _ in micro)  # repeats completing the last batch are counted once
                tokens = sum(real for _, _, real in micro)
                result = engine.train_step([to_device(b, engine.device) for b, _, _ in micro])
                engine.hooks.after_step(step + 1)
                # Whether any rank was asked to stop: every rank then stops after this same step (a host reduction).
                asked = dist.any_rank(requests.received) > 0
                step += 1
                beat(step, "training")
                log.tick(step)
                pending.add(step, epoch, result, samples, tokens)
                evaluating = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total
                evaluating = bool(evaluating and task.eval is not None and not asked)
                periodic = save is not None and every and (step % every == 0 or step >= total)
                if (
                    step == totals.first_step
                    or step % cfg.train.log_every == 0
                    or step >= total
                    or evaluating
                    or periodic
                    or asked
                ):
                    _read(pending, totals, cfg, log)  # the figures are checked before an eval or a checkpoint
                best = False
                if evaluating:
                    metrics, outputs = evaluate(engine, task, recipe, cfg, ranks)
                    best = evals.evaluated(step, metrics, log)
                stopping = evaluating and evals.stop
                # A checkpoint at the end of training: the last step, or the one early stopping ends at.
                saving = save is not None and (asked or periodic or (stopping and every) or (best and evals.keep_best))
                path = None
                if saving:
                    path = save(Position(step=step, epoch=epoch, batches_done=done))
                    if best and evals.keep_best:
                        evals.best_checkpoint = path
                if evaluating or saving:
                    pending.restart_clock()  # training throughput leaves evaluation and checkpoints out
                if stopping:
                    log.end_progress()
                    log.event("early_stop", step, **evals.selection.state())
                    if ranks.is_main:
                        log.console.print(evals.selection.why_stopped(step))
                    evals.stopped_at = step
                    evals.last = (step, metrics, outputs)  # the run's final evaluation: not done again
                    total = step  # ends both loops, as the last step does
                if asked and step < total:
                    log.end_progress()
                    what = signal_name(requests.received) if requests.received else "a stop signal to another rank"
                    raise Preempted(
                        f"{what} after step {step} of {total}: checkpoint {path} written; rerun with resume=auto "
                        f"(exit {REQUEUE_EXIT_CODE})"
                    )
                if step >= total:
                    break
            epoch += 1
    _read(pending, totals, cfg, log)
    log.end_progress()
    return totals.summary(step)


@dataclass
class Evaluations:
    """The evaluations of a run: the metric followed (train.metric_for_best) when early stopping or keep_best ask for
    it, the checkpoint of the best, and the evaluation early stopping ended at (the run's final one)."""

    selection: Selection | None = None
    keep_best: bool = False
    """checkpoint.keep_best: write a checkpoint at each evaluation that is the best so far."""
    best_checkpoint: str | None = None
    """The checkpoint of the best evaluation (keep_best)."""
    last: tuple[int, dict, dict] | None = None
    """(step, metrics, per-example outputs) of the evaluation early stopping ended training at."""
    stopped_at: int | None = None
    """The step early stopping ended training at."""

    def evaluated(self, step: int, metrics: dict, log: RunLog) -> bool:
        """Log the evaluation at `step` and count it; True when it is the best so far."""
        log.eval(step, metrics)
        return self.selection is not None and self.selection.update(step, metrics)

    @property
    def stop(self) -> bool:
        return self.selection is not None and self.selection.stop


@dataclass
class _Totals:
    """What the run's summary says of training, summed over the reads."""

    first_step: int
    """The step whose end the run reports as its first (time to first step): 1, or a resumed run's next."""
    first_step_time: float | None = None
    samples: float = 0.0
    seconds: float = 0.0
    tokens: float = 0.0
    steady_samples: float = 0.0
    """The steady state: the steps after the first (start-up's compilation, allocation and warm caches left out)."""
    steady_tokens: float = 0.0
    steady_seconds: float = 0.0

    def summary(self, steps: int) -> dict:
        busy = self.seconds
        return {
            "steps": steps,
            "train_samples": int(self.samples),
            "train_seconds": round(busy, 2),
            "train_samples_per_s": round(self.samples / busy, 2) if busy else 0.0,
            "train_tokens": int(self.tokens),
            "train_tokens_per_s": round(self.tokens / busy, 2) if busy else 0.0,
            **({"first_step_time": round(self.first_step_time, 3)} if self.first_step_time is not None else {}),
            **self._steady(),
        }

    def _steady(self) -> dict:
        if not self.steady_seconds:
            return {}
        return {
            "steady_samples_per_s": round(self.steady_samples / self.steady_seconds, 2),
            "steady_tokens_per_s": round(self.steady_tokens / self.steady_seconds, 2),
        }


def _read(pending: Pending, totals: _Totals, cfg: RunConfig, log: RunLog) -> None:
    """Read the queued steps (the interval's one host sync), stop on a non-finite one, log each."""
    figures, seconds = pending.read()
    if totals.first_step_time is None and figures and figures[0].step == totals.first_step:
        totals.first_step_time = time.time()  # the end of the first step, on the wall clock (unix seconds)
    for f in figures:
        _check_finite(f, cfg, log)
        log.step(
            f.step,
            loss=f.loss,
            lr=f.lr,
            grad_norm=f.grad_norm,
            samples=f.samples,
            tokens=f.tokens,
            seconds=seconds / len(figures),
            epoch=f.epoch,
        )
        totals.samples += f.samples
        totals.tokens += f.tokens
    totals.seconds += seconds
    if figures and figures[0].step > totals.first_step:  # the first step is read alone, at its end
        totals.steady_samples += sum(f.samples for f in figures)
        totals.steady_tokens += sum(f.tokens for f in figures)
        totals.steady_seconds += seconds


def _check_finite(f: StepFigures, cfg: RunConfig, log: RunLog) -> None:
    """Stop when the job's loss or gradient norm is nan or inf. Every rank reads the same all-reduced figures at the
    same steps, so every rank stops at the same point. An fp16 step the loss scaler skipped (overflowing gradients,
    scale lowered) is expected and goes on."""
    norm = f.grad_norm
    if math.isfinite(f.loss) and (f.skipped or norm is None or math.isfinite(norm)):
        return
    log.close()
    what = f"the loss is {f.loss}" if not math.isfinite(f.loss) else f"the gradient norm is {norm}"
    raise TrainingStopped(
        f"step {f.step}: {what}: training diverged, so it stopped here and saved no weights; lower train.lr "
        f"(now {cfg.train.lr:g}), keep train.max_grad_norm on (now {cfg.train.max_grad_norm:g}), or check the "
        f"data of this step"
    )


def real_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens: the attention mask's ones, or every input id when there is no mask."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def evaluate(engine: Engine, task: Task, recipe, cfg: RunConfig, ranks: dist.Ranks) -> tuple[dict, dict]:
    """Metrics over the whole eval set, gathered from every rank; also returns the per-example outputs."""
    shard = EvalShard(len(task.eval), ranks.rank, ranks.world_size)

    def collate(indices: list[int]):
        rows = [task.eval[max(i, 0)] for i in indices]
        return torch.tensor(indices), task.collate(rows)

    # Its own generator, as the training loader's: an evaluation must not move the random state training goes on
    # with (a resumed run may evaluate at other steps, train.eval_every, and still train exactly alike).
    loader = DataLoader(
        by_length(list(shard), task.eval),
        batch_size=cfg.train.micro_batch_size,
        collate_fn=collate,
        generator=torch.Generator(),
    )
    parts: list[dict[str, torch.Tensor]] = []
    engine.train(False)
    with torch.no_grad():
        for index, batch in beating(loader, "evaluating"):
            batch = to_device(batch, engine.device)
            out = recipe.eval_outputs(engine.forward(batch), batch)
            keep = index >= 0
            parts.append({"index": index[keep], **{k: _cpu(v)[keep] for k, v in out.items()}})
    engine.train(True)
    local = {k: cat_padded([p[k] for p in parts]) for k in parts[0]} if parts else {}
    merged: dict[str, list] = {}
    for piece in dist.gather_objects(local):
        for k, v in piece.items():
            merged.setdefault(k, []).append(v)
    gathered = {k: cat_padded(v) for k, v in merged.items()}
    order = torch.argsort(gathered["index"])
    gathered = {k: v[order] for k, v in gathered.items()}
    assert len(gathered["index"]) == len(task.eval), "every eval example is scored exactly once"
    return recipe.compute_metrics(gathered, task), gathered


def by_length(indices: list[int], rows) -> list[int]:
    """The shard's examples longest first (its -1 padding rows last): batches of like lengths pad less, as
    length-grouped training batches do (measured: SST-2's test set scored in about half the time). Outputs are put
    back in order by index, so metrics do not depend on it. Rows without a list of input ids keep their order."""
    real = [i for i in indices if i >= 0]
    try:
        lengths = {i: len(rows[i]["input_ids"]) for i in real}
    except (KeyError, TypeError, IndexError):
        return indices
    return sorted(real, key=lambda i: -lengths[i]) + [i for i in indices if i < 0]


def cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-example outputs along the batch; rows of varying width (e.g. one prediction per word,
    batches padded to their own longest sentence) are right-padded with -1 to the widest."""
    if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts)
    width = max(p.shape[-1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=-1) for p in parts])


def _cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.float() if t.is_floating_point() else t  # bf16 logits are stored as fp32

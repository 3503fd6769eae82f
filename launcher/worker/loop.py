"""The one training loop: batches -> engine -> metrics. It never asks which strategy is running."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from launcher.config import RunConfig
from launcher.data import EvalShard
from launcher.data.sampling import DistributedBatchSampler
from launcher.errors import REQUEUE_EXIT_CODE, Preempted, TrainingStopped
from launcher.signals import signal_name
from launcher.task import Task
from launcher.worker import dist
from launcher.worker.checkpoint import Position
from launcher.worker.preempt import stop_requests
from launcher.worker.runlog import RunLog
from launcher.worker.strategies.base import Engine
from launcher.worker.watchdog import beat, beating


def train_loader(task: Task, cfg: RunConfig, ranks: dist.Ranks) -> DataLoader:
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
    return DataLoader(
        _Marked(task.train),
        batch_sampler=sampler,
        collate_fn=_Collate(task.collate),
        generator=torch.Generator().manual_seed(cfg.seed),
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
    """(the recipe's batch, how many of its examples are not repeats): throughput counts each example once."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        return self.collate([row for row, _ in items]), sum(fresh for _, fresh in items)


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
) -> dict:
    """Train to the plan's last step, from `start` (a resumed checkpoint's position) or from the beginning;
    `save(position)` writes a checkpoint every checkpoint.every_steps steps and after the last. A stop signal to
    any rank (worker.preempt) ends training after the step under way on every rank, with a checkpoint of it:
    errors.Preempted."""
    total = total_steps(loader, cfg)
    step, epoch, seen, busy, real = 0, 0, 0.0, 0.0, 0.0
    sampler = loader.batch_sampler
    if start is not None:
        step, epoch = start.step, start.epoch
        sampler.load_state_dict({"epoch": epoch, "batches_done": start.batches_done, "seed": sampler.seed})
    count_tokens = task.count_tokens or real_tokens
    if cfg.train.eval_at_start and task.eval is not None and start is None:
        log.eval(0, evaluate(engine, task, recipe, cfg, ranks)[0])
    every = cfg.checkpoint.every_steps
    engine.train(True)
    log.begin(step)
    beat(step, "training")  # the watchdog counts from here (a resumed run: from its checkpoint's step)
    with stop_requests() as requests:
        while step < total:
            sampler.set_epoch(epoch)
            done = sampler.skip  # micro-batches of this epoch trained before (a resumed epoch)
            for micro in groups(loader, cfg.train.grad_accum):
                done += len(micro)
                t0 = time.perf_counter()
                samples = sum(fresh for _, fresh in micro)  # repeats completing the last batch are not counted twice
                micro = [to_device(b, engine.device) for b, _ in micro]
                tokens = sum(count_tokens(b) for b in micro)
                result = engine.train_step(micro)
                # One small all-reduce: the logged loss and throughput are the whole job's, on every rank.
                # ... and whether any rank was asked to stop: every rank then stops after this same step.
                stats = torch.tensor(
                    [result.loss, samples, tokens, requests.received], dtype=torch.float64, device=engine.device
                )
                torch.distributed.all_reduce(stats)
                step += 1
                beat(step, "training")
                _check_finite(step, stats[0].item() / ranks.world_size, result, cfg, log)
                elapsed = time.perf_counter() - t0
                seen, busy, real = seen + stats[1].item(), busy + elapsed, real + stats[2].item()
                log.step(
                    step,
                    loss=stats[0].item() / ranks.world_size,
                    lr=result.lr,
                    grad_norm=result.grad_norm,
                    samples=stats[1].item(),
                    tokens=stats[2].item(),
                    seconds=elapsed,
                    epoch=epoch,
                )
                asked = stats[3].item() > 0
                evaluating = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total
                if evaluating and task.eval is not None and not asked:
                    log.eval(step, evaluate(engine, task, recipe, cfg, ranks)[0])
                path = None
                if save is not None and (asked or (every and (step % every == 0 or step >= total))):
                    path = save(Position(step=step, epoch=epoch, batches_done=done))
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
    log.end_progress()
    return {
        "steps": step,
        "train_samples": int(seen),
        "train_seconds": round(busy, 2),
        "train_samples_per_s": round(seen / busy, 2) if busy else 0.0,
        "train_tokens": int(real),
        "train_tokens_per_s": round(real / busy, 2) if busy else 0.0,
    }


def _check_finite(step: int, loss: float, result, cfg: RunConfig, log: RunLog) -> None:
    """Stop when the job's loss or gradient norm is nan or inf. Every rank sees the same all-reduced loss and
    the same global norm, so every rank stops at the same step. An fp16 step the loss scaler skipped (overflowing
    gradients, scale lowered) is expected and goes on."""
    norm = result.grad_norm
    if math.isfinite(loss) and (result.skipped or norm is None or math.isfinite(norm)):
        return
    log.close()
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
    raise TrainingStopped(
        f"step {step}: {what}: training diverged, so it stopped here and saved no weights; lower train.lr "
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
        list(shard), batch_size=cfg.train.micro_batch_size, collate_fn=collate, generator=torch.Generator()
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

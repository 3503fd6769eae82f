"""What a rank's run reports besides its steps: the start table, the live view's GPU figures, summary.json's figures,
the done table and the evaluation's predictions."""

from __future__ import annotations

import json
import os
import resource

from launcher.choices import Full
from launcher.config import RunConfig, choice_name
from launcher.errors import ConfigError
from launcher.worker import dist
from launcher.worker.assembly import Adapted
from launcher.worker.checkpoint import Position
from launcher.worker.trackers import tracker_places


def start_rows(
    cfg: RunConfig, ranks, adapted: Adapted, task, total: int, start: Position | None, notes: list[str]
) -> list[tuple[str, str]]:
    """The start table: model, adapter, strategy, batch, data, steps, output and the notes."""
    params, trainable = adapted.parameters, adapted.trainable
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum * ranks.world_size
    return [
        ("model", f"{cfg.model} ({params / 1e6:.1f}M parameters)"),
        ("adapter", f"{choice_name(cfg.adapter)}: {trainable:,} trainable ({100 * trainable / params:.2f}%)"),
        (
            "strategy",
            f"{choice_name(cfg.strategy)} on {ranks.world_size} process(es), {ranks.device.type}, {cfg.precision}",
        ),
        (
            "batch",
            f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} accum x {ranks.world_size} ranks "
            f"= {effective} per step",
        ),
        ("data", f"{len(task.train):,} train / {len(task.eval) if task.eval is not None else 0:,} eval examples"),
        (
            "steps",
            f"{total:,} at lr {cfg.train.lr:g} ({cfg.train.schedule})"
            + (f", from step {start.step}" if start is not None else ""),
        ),
        ("output", cfg.output_dir),
        *[("note", note) for note in notes],
    ]


def peak_rss_mib_per_rank() -> list[float]:
    """Every rank's peak resident memory (ru_maxrss is KiB on Linux): the memory a run really needed per rank.
    Collective: every rank calls it."""
    return [round(kib / 1024, 1) for kib in dist.gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)]


def done_rows(cfg: RunConfig, content: dict) -> list[tuple[str, str]]:
    """The done table, from summary.json's content: metrics, steps, memory, where the model and the figures are."""
    return [
        *[(k, f"{v:.4f}") for k, v in content["metrics"].items()],
        ("steps", f"{content['steps']} ({content['train_samples_per_s']:.1f} samples/s)"),
        ("memory per rank", memory_line(content["peak_rss_mib_per_rank"], content["model_state_bytes_per_rank"])),
        ("model" if isinstance(cfg.adapter, Full) else "adapter", content["saved"]),
        ("metrics", os.path.join(cfg.output_dir, "metrics.jsonl")),
        ("tensorboard", os.path.join(cfg.output_dir, "tensorboard")),
        *tracker_places(cfg.tracking, cfg.output_dir),
    ]


def selection_summary(selection, evals, keep_best: bool) -> dict:
    """summary.json's word on the metric followed: the best evaluation, whether the saved model is it, and the step
    early stopping ended at."""
    if selection is None:
        return {}
    best = {"metric": selection.metric, "higher_is_better": selection.higher}
    best |= {"step": selection.best_step, "value": selection.best_value, "saved": keep_best}
    if keep_best:
        best["checkpoint"] = evals.best_checkpoint
    return {"best": best, "stopped_early_at": evals.stopped_at}


def gpu_view(cfg: RunConfig, task, ranks) -> dict:
    """What the live view shows on a GPU rank besides the CPU's figures: allocated and reserved memory, and MFU
    from the planner's model FLOPs per token (launcher.planning.timing, at data.max_length) and the GPU's peak."""
    import torch

    from launcher.planning.counting import cached_count, planning_config
    from launcher.planning.timing import flops_per_token
    from launcher.worker.live import peak_tflops

    device = ranks.device

    def memory() -> str:
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        return f"GPU {allocated / 2**30:.1f} GiB allocated, {reserved / 2**30:.1f} GiB reserved"

    flops = None
    try:
        config = planning_config(cfg.model)
        heads = tuple(task.heads)
        counts = cached_count(config, heads)
        flops = flops_per_token(counts, config, cfg, getattr(cfg.data, "max_length", 512), heads)["model"]
    except (ConfigError, OSError, KeyError, ValueError):  # a model the planner cannot count: no MFU, the rest shown
        pass
    return {"memory": memory, "flops_per_token": flops, "peak_tflops": peak_tflops(torch.cuda.get_device_name(device))}


def peak_gpu(ranks) -> dict:
    """Every GPU rank's peak of allocated device memory (torch's caching allocator), in MiB."""
    import torch

    if ranks.device.type != "cuda":
        return {}
    peak = round(torch.cuda.max_memory_allocated(ranks.device) / 2**20, 1)
    return {"peak_gpu_mib_per_rank": dist.gather_objects(peak)}


def memory_line(peak_mib: list[float], held: list[dict | None]) -> str:
    """'peak RSS 1234 MiB, model state 5.52 GiB held (rank 1)': the rank with the highest peak."""
    rank = max(range(len(peak_mib)), key=lambda r: peak_mib[r])
    line = f"peak RSS {peak_mib[rank]:.0f} MiB"
    state = held[rank] if rank < len(held) else None
    if state:
        total = sum(sum(where.values()) for where in state.values())
        shown = f"{total / 2**30:.2f} GiB" if total >= 2**30 else f"{total / 2**20:.1f} MiB"
        line += f", model state {shown} held (rank {rank})"
    return line


def write_predictions(path: str, outputs: dict) -> None:
    rows = zip(*[[(k, v.tolist()) for v in values] for k, values in outputs.items()])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            record = dict(row)
            record["index"] = int(record["index"])
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)

"""What a new user notices in the first hour: what the launcher is doing before training, the first progress
line, throughput that counts each example once, a dry run that leaves nothing behind."""

from __future__ import annotations

import io
import os

from rich.console import Console

from launcher.data.sampling import DistributedBatchSampler
from launcher.worker.loop import _Collate, _Marked
from launcher.worker.runlog import RunLog
from tests.conftest import RECIPE, run, tiny_args


def test_samples_per_epoch_count_each_example_once_though_the_last_batch_is_completed():
    rows = [{"x": i} for i in range(10)]
    seen = []
    for rank in range(2):
        sampler = DistributedBatchSampler(10, 4, rank=rank, world_size=2, seed=3, mark_repeats=True)
        for indices in sampler:
            batch, fresh, tokens = _Collate(lambda r: [x["x"] for x in r], len)([_Marked(rows)[j] for j in indices])
            assert tokens == 4
            assert len(batch) == 4, "every rank still runs full micro-batches"
            seen.append((batch, fresh))
    assert sum(f for _, f in seen) == 10 and sum(len(b) for b, _ in seen) == 16
    assert sorted({x for b, _ in seen for x in b}) == list(range(10))


def test_the_progress_bar_shows_no_nan_before_the_first_step(tmp_path):
    log = RunLog(str(tmp_path), active=True, total_steps=3, log_every=1)
    out = io.StringIO()
    log.console = Console(file=out, force_terminal=True, width=120)
    log.begin()
    log._progress.refresh()
    assert "first step" in out.getvalue() and "nan" not in out.getvalue()
    log.step(1, loss=0.6931, lr=1e-3, grad_norm=1.0, samples=8, seconds=0.5, epoch=0)
    log._progress.refresh()
    assert "loss 0.6931  lr 1.00e-03  16.0 samples/s" in out.getvalue()
    log.close()


def test_the_launcher_says_what_it_does_before_the_first_step(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = run(
        ["launcher", "run", RECIPE, "--nproc", "2", *tiny_args(tiny_model, tiny_data, out, "train.max_steps=1")],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x.split(" (")[0].strip() for x in proc.stdout.splitlines() if x.startswith("lora_cls: ")]
    assert lines[:6] == [
        "lora_cls: checking the settings and the data",
        f"lora_cls: starting 2 process(es) in {out}",
        "lora_cls: reading and tokenizing the data",
        "lora_cls: building the model",
        "lora_cls: applying lora and ddp on 2 process(es)",
        "lora_cls: starting",
    ], proc.stdout


def test_a_dry_run_leaves_no_datasets_cache(tiny_model, tiny_data, tmp_path):
    cache = tmp_path / "hf-datasets"
    data = tmp_path / "fresh.jsonl"
    data.write_text(tiny_data["train"].read_text() + '{"text": "a row no cache has seen", "label": "positive"}\n')
    args = tiny_args(tiny_model, {"train": data, "test": tiny_data["test"]}, tmp_path / "run")
    proc = run(
        ["launcher", "run", RECIPE, "--nproc", "2", "--dry-run", *args],
        cwd=tmp_path,
        env={"HF_DATASETS_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not cache.exists() or not any(os.scandir(cache)), sorted(p.name for p in cache.rglob("*"))[:10]
    assert not (tmp_path / "run").exists()

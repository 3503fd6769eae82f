"""What a new user notices in the first hour: what the launcher is doing before training, the first progress
line, throughput that counts each example once, a dry run that leaves nothing behind."""

from __future__ import annotations

import io
import json
import os

from rich.console import Console

from launcher.data.sampling import DistributedBatchSampler
from launcher.worker.loop import _Collate, _Marked
from launcher.worker.runlog import RunLog
from tests.conftest import RECIPE, run, tiny_args
from tests.test_launch_forms import assert_quiet


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
        # 48 x 2 ranks: each step is a whole epoch of the 96 rows.
        ["launcher", "run", RECIPE, "--nproc", "2", *tiny_args(tiny_model, tiny_data, out, "train.max_steps=3",
                                                               "train.micro_batch_size=48")],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The epoch is counted from 1 in the output and in metrics.jsonl alike.
    shown = [x.split("  epoch ")[1].split()[0] for x in proc.stdout.splitlines() if x.startswith("step ")]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert shown == ["1", "2", "3"] and [r["epoch"] for r in rows if r["split"] == "train"] == [1, 2, 3], shown
    # Every file of the run has the mode the umask gives (safetensors writes 0600 on its own).
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {k: m for k, m in modes.items() if m != 0o666 & ~mask} == {}, modes
    assert "adapter/adapter_model.safetensors" in modes
    # Off a terminal: one record per line, never wrapped, no padding (in the output and in rank 0's log alike).
    for text in (proc.stdout, (out / "logs" / "rank0.log").read_text()):
        steps = [x for x in text.splitlines() if x.startswith("step ")]
        assert [x.split()[1] for x in steps] == ["1/3", "2/3", "3/3"], text
        assert all(" smoothed loss " in x and x.split(" smoothed loss ")[1][0].isdigit() for x in steps), steps
        assert [x for x in text.splitlines() if x != x.rstrip()] == []
    assert_quiet(proc.stdout + proc.stderr)
    lines = [x.split(" (")[0].strip() for x in proc.stdout.splitlines() if x.startswith("lora_cls: ")]
    assert lines[:6] == [
        "lora_cls: checking the settings and the data",
        f"lora_cls: starting 2 process(es) in {out}",
        "lora_cls: reading and tokenizing the data",
        "lora_cls: building the model",
        "lora_cls: applying lora and ddp on 2 process(es)",
        "lora_cls: starting",
    ], proc.stdout


def test_the_matrix_off_a_terminal_is_whole_lines():
    from launcher.compat import RULES
    from tests.conftest import ROOT, launcher_cli

    proc = launcher_cli(["matrix"], cwd=ROOT)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and [x for x in lines if x != x.rstrip()] == []
    assert any(f"1. {RULES[0].reason}." in x for x in lines), "a rule's sentence on one line"


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


def test_more_processes_than_cores_on_cpu_get_a_note(tmp_path):
    from tests.conftest import launcher_cli

    cores = len(os.sched_getaffinity(0))
    proc = launcher_cli(
        ["run", RECIPE, "--nproc", str(cores + 1), "--dry-run", f"output_dir={tmp_path / 'r'}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert f"note: --nproc {cores + 1} on {cores} CPU core(s): the processes share the cores" in proc.stderr
    fits = launcher_cli(["run", RECIPE, "--nproc", "1", "--dry-run", f"output_dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert "CPU core(s)" not in fits.stderr

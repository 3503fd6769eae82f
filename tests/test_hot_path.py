"""The training step never waits for the device: its figures are read once per logged interval."""

from __future__ import annotations

import json
import math

from tests.conftest import BIN, RECIPE, ROOT, run, tiny_args, why_failed


def test_a_2_rank_zero2_run_reads_device_values_once_per_logged_interval(tiny_model, tiny_data, tmp_path):
    """Every read of a tensor's value by our code (.item(), .tolist(), float(t), ...) while the loop trains, counted
    on both ranks of a ZeRO-2 run with 2 micro-batches a step: one read of the queued figures at the first step
    (the first progress line) and at each logged step, none in between; the stop-request reduction reads a host
    tensor (gloo) once a step, as it should."""
    out = tmp_path / "run"
    # host_memory=lean on a tiny model: the heap trimming between blocks reads no device values either.
    settings = tiny_args(
        tiny_model, tiny_data, out, "strategy=zero2", "train.max_steps=12", "train.log_every=4",
        "train.grad_accum=2", "train.micro_batch_size=4", "host_memory=lean",
    )  # fmt: skip
    argv = [
        f"{BIN}/torchrun", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests/helpers/sync_count.py"), str(tmp_path / "reads-{rank}.json"), str(RECIPE), *settings,
    ]  # fmt: skip
    proc = run(argv, cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    for rank in (0, 1):
        steps = json.loads((tmp_path / f"reads-{rank}.json").read_text())["steps"]
        figures = {int(s): [r for r in reads if r[1] != "any_rank"] for s, reads in steps.items()}
        figures = {s: reads for s, reads in figures.items() if reads}
        assert sorted(figures) == [1, 4, 8, 12], figures
        assert all(
            len(reads) == 1 and reads[0][:2] == ["launcher/worker/figures.py", "read"] for reads in figures.values()
        )
        host = {int(s): sum(r[1] == "any_rank" for r in reads) for s, reads in steps.items()}
        assert max(host.values()) == 1 and sum(host.values()) == 12, host  # one per step (0..11: before each end)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["samples_per_s"] > 0 for r in train), train
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_samples"] == 12 * 2 * 2 * 4 and summary["first_step_time"] > 0, summary
    assert summary["host_memory"] == "lean", summary
    # Training seconds are every step's: at least what steps 5-12 took between their lines on the wall clock.
    assert summary["train_seconds"] >= 0.9 * (train[-1]["time"] - train[0]["time"]) > 0, (summary, train)
    # The steady state leaves the first step out: 11 steps' samples over their seconds.
    assert 0 < summary["steady_samples_per_s"] and 0 < summary["steady_tokens_per_s"], summary

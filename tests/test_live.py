"""Rank 0's live view: plain lines where the output is not a terminal, a panel under the bar where it is."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from launcher.worker import live
from launcher.worker.runlog import RunLog

LOSSES = [0.9, 0.7, 0.6, 0.4]


def _run(tmp_path, console: Console, **view) -> RunLog:
    """Four steps of 8 samples, 100 tokens, 0.5 s each, logged every 2; an eval after step 2, then a checkpoint."""
    log = RunLog(
        str(tmp_path), active=True, total_steps=4, log_every=2, epochs=1, memory=lambda: "RSS 1.25 GiB", **view
    )
    log.console = console
    log.begin()
    for step, loss in enumerate(LOSSES, start=1):
        log.step(step, loss=loss, lr=1e-3, grad_norm=1.0, samples=8, tokens=100, seconds=0.5, epoch=0)
        if step == 2:
            log.eval(2, {"accuracy": 0.75})
            log.checkpointed()
        if log._progress is not None:
            log._progress.refresh()
    return log


def _ema(values, beta=0.9):
    mean = 0.0
    for v in values:
        mean = beta * mean + (1 - beta) * v
    return mean / (1 - beta ** len(values))


def test_a_log_that_is_not_a_terminal_gets_one_plain_line_per_logged_step(tmp_path):
    out = io.StringIO()
    log = _run(tmp_path, Console(file=out, force_terminal=False, width=300))
    log.close()
    text = out.getvalue()
    assert "\x1b[" not in text  # no cursor movement or colour codes in a log file
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and steps[0].startswith("step 2/4  loss 0.7000  lr 1.00e-03  16.0 samples/s  200 tokens/s")
    last = steps[1]
    for part in (
        "step 4/4", "loss 0.4000", f"smoothed loss {_ema(LOSSES):.4f}", "epoch 1/1", "ETA 0s", "RSS 1.25 GiB",
        "last eval accuracy 0.7500", "checkpoint 0s ago",
    ):  # fmt: skip
        assert part in last, (part, last)
    assert "ETA 1s" in steps[0]  # two steps of 0.5 s left
    assert "MFU" not in text  # no GPU peak known: none shown


def test_a_terminal_gets_the_bar_and_a_panel_with_every_field(tmp_path):
    out = io.StringIO()
    # 1e12 model FLOPs per token at 200 tokens/s on 2 ranks of a 989 TFLOP/s GPU: 10.1%.
    log = _run(tmp_path, Console(file=out, force_terminal=True, width=120), flops_per_token=1e12, peak_tflops=989.0,
               world_size=2)  # fmt: skip
    snapshot = log.snapshot
    log.close()
    text = out.getvalue()
    assert "\x1b[" in text  # drawn in place
    for name in ("step", "epoch", "loss", "lr", "throughput", "MFU", "ETA", "memory", "eval", "checkpoint"):
        assert name in text, name
    assert "4/4" in text and "RSS 1.25 GiB" in text and "accuracy 0.7500 (step 2)" in text
    assert snapshot.mfu == pytest.approx(1e12 * 200 / (2 * 989e12))
    assert "10.1%" in text
    assert snapshot.smoothed_loss == pytest.approx(_ema(LOSSES))


def test_gpu_peaks_are_matched_by_name_and_unknown_gpus_get_no_mfu():
    assert live.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert live.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert live.peak_tflops("NVIDIA H200") == 989.0
    assert live.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert live.peak_tflops("NVIDIA L40S") == 362.0 and live.peak_tflops("NVIDIA L4") == 121.0
    assert live.peak_tflops("Tesla T4") is None


def test_the_smoothed_loss_starts_at_the_first_value_and_skips_non_finite_ones():
    s = live.Smoothed()
    assert math.isnan(s.value)
    assert s.add(2.0) == pytest.approx(2.0)
    assert s.add(math.nan) == pytest.approx(2.0)
    assert s.add(1.0) == pytest.approx(_ema([2.0, 1.0]))


@pytest.mark.parametrize("seconds, shown", [(0.4, "0s"), (42, "42s"), (185, "3m05s"), (7620, "2h07m")])
def test_durations_read_as_a_person_says_them(seconds, shown):
    assert live.duration(seconds) == shown

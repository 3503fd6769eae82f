"""benchmarks/compare.py in its smoke form: ours and the peer (Trainer + peft under DeepSpeed's runner)
each train a few steps of the same workload, and every figure of both is read from what they wrote."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.conftest import ROOT, needs_dataset, run, why_failed


@pytest.mark.long
@needs_dataset("sst2")
def test_compare_smoke_runs_ours_and_the_peer_and_reads_every_figure(tmp_path):
    out = tmp_path / "compare"
    proc = run(
        [sys.executable, str(ROOT / "benchmarks/compare.py"), "lora_cls", "--smoke", f"--out={out}"],
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, why_failed(proc)
    report = json.loads((out / "compare.json").read_text())
    assert sorted(report["medians"]) == ["ours", "peer"]
    for side, figures in report["medians"].items():
        assert 0 < figures["to_first_step_s"] < figures["wall_s"], (side, figures)
        assert figures["samples_per_s"] > 0 and figures["tokens_per_s"] > figures["samples_per_s"], (side, figures)
        assert figures["peak_mib_per_rank"] > 100, (side, figures)
        assert 0 <= figures["accuracy"] <= 1 and math.isfinite(figures["accuracy"]), (side, figures)
    # The peer really ran as two DeepSpeed ranks, and trained the steps it was given.
    ranks = [json.loads((out / "peer-0" / f"peer-rank-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps"] == 3 for r in ranks), ranks
    assert "| samples_per_s |" in proc.stdout and "ours / peer" in proc.stdout

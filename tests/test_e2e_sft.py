"""End to end on real data: Alpaca, a tiny random-weight Llama with a BPE tokenizer learnt from the data, QLoRA
(the recipe's default), packing, 2 ranks; the eval loss must fall by at least 30%."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT, SHARED, needs_dataset, run, why_failed

pytestmark = [pytest.mark.long, needs_dataset("alpaca")]


def test_alpaca_qlora_eval_loss_falls_30_percent(tmp_path):
    # Seeded: these settings took the eval loss from 8.356 to 5.605 (-32.9%) in under 2 minutes here (250 steps at
    # lr 2e-3 went to 5.275, -36.9%, in 2 min 40 s; 150 at 3e-3 fell short, -29.8%).
    out = tmp_path / "run"
    data = SHARED / "alpaca"
    settings = [
        f"data.train={data / 'train.jsonl'}",
        f"data.eval={data / 'test.jsonl'}",
        "data.max_eval_rows=100",
        "data.max_length=256",
        "tokenizer_vocab=4000",
        "train.max_steps=180",
        "train.micro_batch_size=4",
        "train.lr=2.5e-3",
        "train.eval_at_start=true",
        f"output_dir={out}",
    ]
    proc = run(
        ["launcher", "run", str(ROOT / "recipes" / "qlora_sft.py"), "--nproc", "2", *settings],
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, why_failed(proc)
    assert "packed 4,496 examples into" in proc.stdout
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [0, 180]
    start, end = evals[0]["loss"], evals[-1]["loss"]
    assert end <= 0.7 * start, f"eval loss {start:.3f} -> {end:.3f} ({100 * (1 - end / start):.1f}% lower)"
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(end), rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] == "qlora" and summary["world_size"] == 2 and summary["train_tokens"] > 0
    # Real (non-padding) tokens over the time spent in steps; packed rows hold at most 256 tokens, 4 per micro-batch.
    assert summary["train_tokens_per_s"] == pytest.approx(summary["train_tokens"] / summary["train_seconds"], rel=1e-2)
    assert summary["train_tokens"] <= summary["steps"] * 2 * 4 * 256
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4 and all(
        g["prompt"].endswith("### Response:\n") and g["reference"] for g in generations
    )

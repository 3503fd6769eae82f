"""End to end on real data: CoNLL-2003, MiniLM + LoRA + CRF head, 2 ranks, scored on the test set."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, SHARED, needs_dataset, run, why_failed

pytestmark = [pytest.mark.long, needs_dataset("conll2003")]


def test_conll2003_crf_reaches_060_entity_f1(tmp_path):
    # Seeded: these settings (one pass over 3,200 sentences) gave test F1 0.7535 in 77 s; twice the steps and rows
    # gave 0.8004 (the same under ZeRO-3; softmax head: 0.76), 30 s longer.
    out = tmp_path / "run"
    data = SHARED / "conll2003"
    settings = [
        "strategy=ddp",
        "head=crf",
        f"data.train={data / 'train.jsonl'}",
        "data.max_train_rows=3200",
        f"data.eval={data / 'test.jsonl'}",
        "train.max_steps=100",
        "train.micro_batch_size=16",
        "train.lr=2e-3",
        f"output_dir={out}",
    ]
    proc = run(
        ["launcher", "run", str(ROOT / "recipes" / "lora_ner.py"), "--nproc", "2", *settings], cwd=tmp_path, timeout=900
    )
    assert proc.returncode == 0, why_failed(proc)
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["world_size"] == 2
    # Tagging every word O (the majority tag) scores entity F1 0; the issue asks for at least 0.60.
    assert metrics["f1"] >= 0.60, metrics
    assert all(metrics[f"f1_{kind}"] > 0.3 for kind in ("PER", "LOC", "ORG", "MISC")), metrics
    predictions = (out / "eval_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3453  # every test sentence scored exactly once across the two ranks

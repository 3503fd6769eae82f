"""lora_cls beyond its pretrained English encoder: a model built from a config with a vocabulary learnt from the data
(Chinese classification with no pretrained Chinese model)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, launcher_cli, run, why_failed

RECIPE = str(ROOT / "recipes" / "lora_cls.py")
FILLER = "房间地点服务价格早餐环境前台设施交通位置"


def _reviews(path: Path, n: int, seed: int) -> Path:
    """Chinese 'reviews': filler characters around a word that decides the label (好 good, 差 bad)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        chars = [rng.choice(FILLER) for _ in range(rng.randint(6, 14))]
        chars.insert(rng.randrange(len(chars)), "很好" if label else "太差")
        rows.append({"text": "".join(chars), "label": label})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_chinese_classification_from_a_config_with_a_character_vocabulary(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, test = _reviews(tmp_path / "train.jsonl", 96, 0), _reviews(tmp_path / "test.jsonl", 32, 1)
    out = tmp_path / "out"
    args = [
        f"model={tiny_model}",  # its shape only: model_init=config draws random weights
        "model_init=config",
        "tokenizer=chars",
        "adapter=full",
        f"data.train={train}",
        f"data.eval={test}",
        "train.micro_batch_size=16",
        "train.max_steps=40",
        "train.lr=3e-3",
        "train.schedule=constant",  # a model from scratch needs its steps at full rate to find the keyword
        "train.warmup_ratio=0",
        "train.log_every=1",
        f"output_dir={out}",
    ]
    proc = run([sys.executable, RECIPE, *args], cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] >= 0.9, summary["metrics"]

    # The saved model and its character tokenizer reload in a plain process to the logits the run evaluated with.
    tok = AutoTokenizer.from_pretrained(out / "model")
    vocab = set(tok.get_vocab())
    assert {"好", "差", "房", "[CLS]"} <= vocab and " " not in vocab
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert model.config.vocab_size == len(tok) < 100  # sized to the characters, not the 30,522 words of the folder
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    saved = {
        r["index"]: r["logits"] for r in map(json.loads, (out / "eval_predictions.jsonl").read_text().splitlines())
    }
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        logits = model(**enc).logits
    assert torch.allclose(logits, torch.tensor([saved[i] for i in range(len(rows))]), atol=1e-4)


def test_a_character_vocabulary_needs_a_model_built_from_its_config(tmp_path):
    train = _reviews(tmp_path / "train.jsonl", 8, 0)
    proc = launcher_cli(
        ["run", RECIPE, f"data.train={train}", "data.eval=", "tokenizer=chars", "--dry-run"], cwd=tmp_path
    )
    assert proc.returncode == 2 and "tokenizer=chars with model_init=pretrained" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

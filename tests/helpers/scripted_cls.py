"""recipes/lora_cls.py whose evaluation also gives a scripted metric `score`, for the early-stopping and keep_best
tests: SCORES (comma-separated) are the scores of the first, second, ... distinct model evaluated. A model is told
apart by its eval logits, so the same weights evaluated again (the best model restored) get their score again."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import launcher
from launcher.recipe import load_recipe

_base = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" / "lora_cls.py"))

Config = _base.Config
check = _base.check
build_task = _base.build_task
build_model = _base.build_model
eval_outputs = _base.eval_outputs

_seen: dict[str, float] = {}


def compute_metrics(gathered, task):
    metrics = _base.compute_metrics(gathered, task)
    key = hashlib.sha256(gathered["logits"].numpy().round(5).tobytes()).hexdigest()
    if key not in _seen:
        scores = [float(v) for v in os.environ["SCORES"].split(",")]
        _seen[key] = scores[min(len(_seen), len(scores) - 1)]
    return {**metrics, "score": _seen[key]}


def main() -> None:
    launcher.run_recipe(sys.modules[__name__])


if __name__ == "__main__":
    main()

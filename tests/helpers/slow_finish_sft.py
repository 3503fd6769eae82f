"""recipes/qlora_sft.py whose end-of-run generations take their time (SLOW_FINISH_SECONDS before each forward) or
fail (FINISH_FAILS=1): the recipe's finish as a long, many-forward piece of work, and as one that breaks."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import launcher
from launcher.recipe import load_recipe

_base = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" / "qlora_sft.py"))

Config = _base.Config
check = _base.check
build_tokenizer = _base.build_tokenizer
build_task = _base.build_task
build_model = _base.build_model
eval_outputs = _base.eval_outputs
compute_metrics = _base.compute_metrics


def finish(engine, task, cfg, ranks) -> None:
    if os.environ.get("FINISH_FAILS") == "1":
        raise RuntimeError("the recipe's finish failed")
    forward, pause = engine.forward, float(os.environ.get("SLOW_FINISH_SECONDS", "0"))

    def slow(batch):
        time.sleep(pause)
        return forward(batch)

    engine.forward = slow
    try:
        _base.finish(engine, task, cfg, ranks)
    finally:
        engine.forward = forward


if __name__ == "__main__":
    launcher.run_recipe(sys.modules[__name__])

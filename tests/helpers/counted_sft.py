"""recipes/qlora_sft.py that counts the training forwards whose loss the fused kernel computed
(launcher.kernels.fused_ce.linear_cross_entropy, as the output layer calls it) and writes the count to
OUTPUT_DIR/fused_ce_calls.json at the end: the positive control that kernels.fused_ce=true really trains through the
kernel, and that the default does not."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import launcher
from launcher.kernels import lm_head
from launcher.recipe import load_recipe

_base = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" / "qlora_sft.py"))

Config = _base.Config
check = _base.check
build_tokenizer = _base.build_tokenizer
build_task = _base.build_task
build_model = _base.build_model
eval_outputs = _base.eval_outputs
compute_metrics = _base.compute_metrics

_calls = []
_kernel = lm_head.linear_cross_entropy


def _counted(*args, **kwargs):
    _calls.append(1)
    return _kernel(*args, **kwargs)


lm_head.linear_cross_entropy = _counted


def finish(engine, task, cfg, ranks) -> None:
    _base.finish(engine, task, cfg, ranks)
    if ranks.is_main:
        with open(os.path.join(cfg.output_dir, "fused_ce_calls.json"), "w") as f:
            json.dump(len(_calls), f)


def main() -> None:
    launcher.run_recipe(sys.modules[__name__])


if __name__ == "__main__":
    main()

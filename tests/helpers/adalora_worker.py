"""AdaLoRA under one strategy after another (torchrun): a tiny BERT classifier trained a few steps on one fixed global
batch, each rank its half (one process: all of it), with the rank budget pruned after every step. Writes each
strategy's per-step losses (mean over the ranks) and the ranks kept, for tests/test_adalora.py."""

from __future__ import annotations

import json
import sys

import torch

from launcher.environment import quiet_libraries
from launcher.worker import dist
from launcher.worker.assembly import wrap
from tests.helpers import imports_frozen, mean_across_ranks
from tests.helpers.matrix_worker import adapted, batch_for, cell_config

STEPS = 5


def global_batch(ranks: dist.Ranks) -> dict[str, torch.Tensor]:
    """This rank's part of the global batch: both fixed halves in one process, its own half in two."""
    if ranks.world_size == 2:
        return batch_for("bert", ranks.rank)
    halves = [batch_for("bert", r) for r in (0, 1)]
    return {k: torch.cat([h[k] for h in halves]) for k in halves[0]}


def run(strategy: str, folder: str, ranks: dist.Ranks) -> dict:
    cfg = cell_config([f"strategy={strategy}", "adapter=adalora", "optimizer=adamw"], folder, "fp32")
    model = adapted("bert", cfg, ranks, total_steps=STEPS)
    model.model.eval()
    engine = wrap(model, cfg, device=ranks.device, total_steps=100).engine
    engine.train(False)
    batch = {k: v.to(ranks.device) for k, v in global_batch(ranks).items()}
    losses = []
    for step in range(1, STEPS + 1):
        losses.append(mean_across_ranks(float(engine.train_step([batch]).loss), ranks.device))
        engine.hooks.after_step(step)  # the budget prunes
    result = {"strategy": strategy, "losses": losses, **engine.hooks.summary()["adalora"]}
    destroy = getattr(getattr(engine, "ds", None), "destroy", None)
    if destroy is not None:
        destroy()
    return result


def main() -> None:
    out, strategies = sys.argv[1], sys.argv[2].split(",")
    quiet_libraries()
    imports_frozen()
    ranks = dist.init()
    results = [run(s, f"{out}.{s}", ranks) for s in strategies]
    if ranks.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.shutdown()


if __name__ == "__main__":
    main()

"""Run by torchrun with 2 ranks: every strategy trains a tiny LoRA classifier on one fixed batch.

Writes, from rank 0, a JSON with per strategy: the losses of 5 steps on the same batch, the names of
parameters that changed and of those that stayed equal (full gathered weights before vs after).
usage: torchrun --nproc_per_node 2 strategy_worker.py OUT.json MODEL_DIR TRAIN.jsonl
"""

from __future__ import annotations

import json
import sys

import torch

from launcher.environment import quiet_libraries
from launcher.overrides import apply_overrides
from launcher.recipe import load_recipe
from launcher.worker import adversarial, dist
from launcher.worker.assembly import adapt, wrap
from launcher.worker.optim import build_optimizer, build_scheduler
from launcher.worker.weights import load_whole
from tests.helpers import imports_frozen, mean_across_ranks

STRATEGIES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
# Each strategy also runs under these variants (settings added to the fp32 baseline).
VARIANTS = {
    "accum2": [],
    "bf16": ["precision=bf16"],
    "fp16": ["precision=fp16"],
    "checkpointing": ["activation_checkpointing=true"],
    "fgm": ["train.adversarial=fgm"],
    "pgd": ["train.adversarial=pgd", "train.adv_alpha=0.5"],
}
ADVERSARIAL = ("fgm", "pgd")
"""Variants refused under ZeRO-3 (launcher.compat); each is also trained in one process, accumulating both ranks'
batches (`alone`), which the 2-rank runs must match."""


def one(
    recipe, strategy: str, model_dir: str, train: str, ranks: dist.Ranks, accum: int = 1, extra: tuple = ()
) -> dict:
    from transformers import AutoTokenizer

    settings = [
        f"strategy={strategy}",
        f"model={model_dir}",
        f"data.train={train}",
        "data.eval=",
        "precision=fp32",
        f"train.micro_batch_size={8 // accum}",
        f"train.grad_accum={accum}",
        "train.lr=1e-2",
        "train.warmup_ratio=0",
        "train.schedule=constant",
        "adapter.dropout=0",
        "output_dir=unused",
    ]
    replaced = {e.split("=", 1)[0] for e in extra}  # a variant's setting replaces the default (a key given twice stops)
    cfg = apply_overrides(recipe.Config(), [s for s in settings if s.split("=", 1)[0] not in replaced] + list(extra))
    task = recipe.build_task(cfg, AutoTokenizer.from_pretrained(model_dir))
    rows = [task.train[i] for i in range(ranks.rank * 8, ranks.rank * 8 + 8)]  # each rank its own fixed batch
    size = 8 // accum
    micro = [task.collate(rows[i : i + size]) for i in range(0, 8, size)]  # the same 8 rows, in `accum` parts
    torch.manual_seed(cfg.seed)
    # Built on meta; this test compares whole weights before and after, so they are loaded whole here.
    base = load_whole(recipe.build_model(cfg, task), cfg.model_path, seed=cfg.seed)
    adapted = adapt(base, cfg, task_type=task.peft_task_type, heads=task.heads, device=ranks.device)
    model = adapted.model
    for m in model.modules():  # no dropout: the fixed batch gives a deterministic loss, in train mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    calls = []
    from transformers.modeling_layers import GradientCheckpointingLayer

    first_block = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))  # a BertLayer
    # transformers checkpoints a block's `forward` (its own hooks run once); what runs inside it runs twice.
    next(first_block.children()).register_forward_hook(lambda *_: calls.append(1))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    engine = wrap(adapted, cfg, device=ranks.device, total_steps=100).engine  # the adversarial loss attached
    engine.train(True)  # checkpointing only recomputes in train mode
    scaler = getattr(engine, "scaler", None)
    # With a loss scaler: the scale before the first step and after each step, and whether each step updated
    # any trainable weight on any rank (a step the scaler skips for an overflow leaves every weight as it was).
    scales = [scaler.get_scale()] if scaler is not None else None
    stepped = [] if scaler is not None else None
    params = [p for p in engine.module.parameters() if p.requires_grad]
    losses = []
    for _ in range(5):
        snapshot = [_local(p).clone() for p in params] if scaler is not None else None
        result = engine.train_step([{k: v.to(ranks.device) for k, v in b.items()} for b in micro])
        losses.append(mean_across_ranks(float(result.loss), ranks.device))
        if scaler is not None:
            scales.append(scaler.get_scale())
            moved = any(not torch.equal(old, _local(p)) for old, p in zip(snapshot, params))
            stepped.append(mean_across_ranks(float(moved), ranks.device) > 0)
    after = engine.gathered_state_dict(trainable_only=False)
    changed = sorted(n for n in before if n in after and not torch.equal(before[n], after[n].to(before[n].dtype)))
    return {
        "losses": losses,
        "changed": changed,
        "unchanged": sorted(set(before) - set(changed)),
        "trainable": trainable,
        "gathered": len(after),
        "block_calls_per_step": len(calls) / 5,
        "loss_scale": scaler.get_scale() if scaler is not None else None,
        "loss_scales": scales,
        "stepped": stepped,
    }


def alone(recipe, model_dir: str, train: str, extra: tuple) -> list[float]:
    """The 5 losses of one process (no engine, no process group) accumulating rank 0's and rank 1's batches: what
    2 ranks with a batch each must train like."""
    from transformers import AutoTokenizer

    from launcher.worker.strategies.base import accumulate_and_step

    settings = [f"model={model_dir}", f"data.train={train}", "data.eval=", "train.lr=1e-2", "train.warmup_ratio=0"]
    settings += ["train.schedule=constant", "adapter.dropout=0", "output_dir=unused", *extra]
    cfg = apply_overrides(recipe.Config(), settings)
    task = recipe.build_task(cfg, AutoTokenizer.from_pretrained(model_dir))
    micro = [task.collate([task.train[i] for i in range(r * 8, r * 8 + 8)]) for r in range(2)]
    torch.manual_seed(cfg.seed)
    base = load_whole(recipe.build_model(cfg, task), cfg.model_path, seed=cfg.seed)
    model = adapt(base, cfg, task_type=task.peft_task_type, heads=task.heads, device=torch.device("cpu")).model
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    optimizer = build_optimizer(model, cfg.train, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.train, 100)
    adversary = adversarial.attach(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for _ in range(5):
        result = accumulate_and_step(
            micro,
            forward=lambda b: model(**b),
            set_sync=lambda _: None,
            optimizer=optimizer,
            scheduler=scheduler,
            params=params,
            max_grad_norm=cfg.train.max_grad_norm,
            micro_loss=adversary.micro_loss,
        )
        losses.append(float(result.loss))
    return losses


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (its shard under FSDP, where parameters are DTensors)."""
    return (p.to_local() if hasattr(p, "to_local") else p).detach()


def main() -> None:
    out, model_dir, train = sys.argv[1:4]
    quiet_libraries()
    imports_frozen()
    ranks = dist.init()
    recipe = load_recipe(sys.argv[4])
    results = {name: {"alone": alone(recipe, model_dir, train, tuple(VARIANTS[name]))} for name in ADVERSARIAL}
    for strategy in STRATEGIES:
        try:
            results[strategy] = one(recipe, strategy, model_dir, train, ranks)
            for name, extra in VARIANTS.items():
                if name == "fp16" and strategy.startswith("zero") and not torch.cuda.is_available():
                    continue  # DeepSpeed's CPU accelerator has no fp16 (refused before launch; see test_compat)
                if name in ADVERSARIAL and strategy == "zero3":
                    continue  # refused before launch (launcher.compat)
                accum = 2 if name == "accum2" else 1
                variant = one(recipe, strategy, model_dir, train, ranks, accum=accum, extra=tuple(extra))
                results[strategy][f"{name}_losses"] = variant["losses"]
                results[strategy][f"{name}_block_calls_per_step"] = variant["block_calls_per_step"]
                results[strategy][f"{name}_loss_scale"] = variant["loss_scale"]
                results[strategy][f"{name}_loss_scales"] = variant["loss_scales"]
                results[strategy][f"{name}_stepped"] = variant["stepped"]
        except Exception as e:  # report per strategy; the test shows which one broke and why
            results[strategy] = {"error": f"{type(e).__name__}: {e}"}
            raise
    if ranks.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.shutdown()


if __name__ == "__main__":
    main()

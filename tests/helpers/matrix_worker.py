"""Run by torchrun with 2 ranks: each given cell of the compatibility matrix trains a tiny model for 3 steps.

A cell is a list of overrides (strategy, adapter, optimizer). For each, rank 0 records the losses on a repeated
batch, which parameters changed, the optimizer-state dtypes, whether a 4-bit base is still 4-bit, the logits of
its batch after training, where the model was saved and what it held of its model state (holdings); the test then
reloads every saved model in a plain process and compares logits, and the holdings with the planner's.
usage: torchrun --nproc_per_node 2 matrix_worker.py OUT.json KINDS CELLS.json [precision]
(KINDS: llama, bert or both, comma-separated: each runs every cell)
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch

from launcher.choices import Lora
from launcher.config import RunConfig
from launcher.environment import quiet_libraries
from launcher.overrides import apply_overrides
from launcher.task import Task
from launcher.worker import dist
from launcher.worker.assembly import Adapted, adapt, wrap
from launcher.worker.export import save_model
from tests.helpers import imports_frozen, mean_across_ranks

HEADS = {"llama": [], "bert": ["classifier"]}
TASK_TYPE = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}
VOCAB, SEQ, ROWS = 128, 16, 4
STEPS = 2
"""Optimizer steps each cell trains (on one repeated batch)."""


LLAMA_SHAPE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
"""The tiny Llama's config.json (the planner counts it as it would a shipped shape)."""


def build_model(kind: str) -> torch.nn.Module:
    """The same tiny random model on every rank and in the reloading test (seeded)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA_SHAPE.items() if k != "model_type"}))
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def batch_for(kind: str, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own fixed batch
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if kind == "llama" else torch.randint(0, 3, (ROWS,), generator=g)
    return batch


def cell_config(overrides: list[str], out: str, precision: str) -> RunConfig:
    cfg = apply_overrides(RunConfig(model="tiny"), overrides)
    extra = [f"precision={precision}", "train.lr=1e-2", "train.warmup_ratio=0", "train.schedule=constant"]
    extra += [f"train.micro_batch_size={ROWS}", f"output_dir={out}"]
    if isinstance(cfg.adapter, Lora):
        extra += ["adapter.dropout=0", "adapter.r=8", "adapter.alpha=16"]
    if cfg.adapter.name == "adalora":  # pruned from 8 to 4 over the cell's two steps
        extra.append("adapter.target_r=4")
    if hasattr(cfg.adapter, "num_virtual_tokens"):
        extra.append("adapter.num_virtual_tokens=4")
    if "8bit" in cfg.optimizer.name:
        extra.append("optimizer.min_8bit_size=0")  # tiny tensors would otherwise keep 32-bit states
    return apply_overrides(cfg, extra)


def innermost_optimizer(opt):
    while hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def state_dtypes(opt) -> list[str]:
    opt = innermost_optimizer(opt)
    keys = ("state1", "state2", "exp_avg", "exp_avg_sq")
    return sorted({str(v.dtype) for st in opt.state.values() for k, v in st.items() if k in keys})


def four_bit_layers(module: torch.nn.Module) -> list[dict]:
    """Every bitsandbytes 4-bit layer: its weight's storage bytes against the unpacked element count."""
    import bitsandbytes as bnb

    out = []
    for name, m in module.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            numel = getattr(w, "ds_numel", w.numel())
            out.append(
                {
                    "name": name,
                    "bytes": numel * w.element_size(),
                    "elements": m.in_features * m.out_features,
                    "quant_state": getattr(w, "quant_state", None) is not None or m.quant_state is not None,
                }
            )
    return out


def same_bits(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Bitwise equality: packed 4-bit weights stored as floats may read as NaN, which never equals itself."""
    after = after.to(before.dtype)
    return before.shape == after.shape and torch.equal(before.view(torch.uint8), after.view(torch.uint8))


def adapted(kind: str, cfg: RunConfig, ranks: dist.Ranks, **kwargs) -> Adapted:
    """The tiny model of `kind` with the cell's adapter (the product's assembly, as a run builds it)."""
    return adapt(build_model(kind), cfg, task_type=TASK_TYPE[kind], heads=HEADS[kind], device=ranks.device, **kwargs)


def run_cell(kind: str, overrides: list[str], out: str, precision: str, ranks: dist.Ranks) -> dict:
    cfg = cell_config(overrides, out, precision)
    adapted_model = adapted(kind, cfg, ranks, total_steps=STEPS)
    model = adapted_model.model
    model.eval()  # no dropout: the repeated batch gives comparable losses
    before = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}

    built = wrap(adapted_model, cfg, device=ranks.device, total_steps=100)
    engine = built.engine
    engine.train(False)
    batch = {k: v.to(ranks.device) for k, v in batch_for(kind, ranks.rank).items()}
    losses = []
    for step in range(1, STEPS + 1):
        losses.append(mean_across_ranks(float(engine.train_step([batch]).loss), ranks.device))
        engine.hooks.after_step(step)  # AdaLoRA prunes as a run does: after each step
    with torch.no_grad():
        logits = engine.forward(batch).logits.float().cpu()
    after = engine.gathered_state_dict(trainable_only=False)
    saved = save_model(engine, cfg, Task(train=None, eval=None, collate=None, peft_task_type=""), None, ranks)
    changed = sorted(n for n in after if n in before and not same_bits(before[n], after[n]))
    result = {
        "overrides": overrides,
        "losses": losses,
        "trainable": trainable,
        "changed": changed,
        "compared": len([n for n in after if n in before]),
        "state_dtypes": state_dtypes(engine.optimizer),
        "four_bit": four_bit_layers(engine.module),
        "logits": logits.tolist(),
        "saved": os.path.abspath(saved),
        # What the rank held of its model state, at its largest: the planner's figures are checked against it.
        "held": built.held.largest.bytes if built.held.largest else None,
        "adalora": engine.hooks.summary().get("adalora"),
    }
    destroy = getattr(getattr(engine, "ds", None), "destroy", None)
    if destroy is not None:
        destroy()
    del engine, model, built, adapted_model
    gc.collect()
    return result


def main() -> None:
    out, kinds, cells_path = sys.argv[1:4]
    precision = sys.argv[4] if len(sys.argv) > 4 else "fp32"
    quiet_libraries()
    imports_frozen()
    ranks = dist.init()
    with open(cells_path) as f:
        cells = json.load(f)
    results = []
    for kind, (i, overrides) in [(k, c) for k in kinds.split(",") for c in enumerate(cells)]:
        start = time.time()
        folder = os.path.join(os.path.dirname(os.path.abspath(out)), f"{kind}-{i}")
        try:
            result = run_cell(kind, overrides, folder, precision, ranks)
        except Exception as e:  # report the cell and go on: the test names every broken cell
            result = {"overrides": overrides, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        result["kind"] = kind
        result["seconds"] = round(time.time() - start, 2)
        results.append(result)
        if ranks.is_main:
            print(f"[{kind}] {' '.join(overrides)}: {result.get('error', 'ok')} ({result['seconds']}s)", flush=True)
    if ranks.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.shutdown()


if __name__ == "__main__":
    main()

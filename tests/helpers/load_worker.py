"""Run by torchrun: a causal LM built on the meta device and loaded by each strategy, checked against a plain load.

usage: torchrun --nproc_per_node N load_worker.py OUT.json FOLDER CASE [CASE ...]
A CASE is STRATEGY:ADAPTER:PRECISION; FOLDER may be random:SHAPE (then the gathered initial weights are hashed,
to compare world sizes). Rank 0 writes, per case: the first loss on a fixed batch, the same loss from a plain
single-process load of the folder (`from_pretrained`, fp32, quantized the old way for qlora), the largest
difference between gathered weights and the folder's tensors, the losses of 2 training steps, the gathered
weights' hashes, and how many parameters were still on meta after the engine was built (must be none).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from launcher.environment import quiet_libraries
from launcher.job import job_from_environ
from launcher.overrides import apply_overrides
from launcher.recipe import load_recipe
from launcher.worker import dist
from launcher.worker.assembly import build_trainable
from launcher.worker.memory import limit_heap_retention
from launcher.worker.weights import Folder, has_meta, source_name
from tests.helpers import imports_frozen


def settings(folder: str, strategy: str, adapter: str, precision: str) -> list[str]:
    return [
        f"model={folder}",
        f"strategy={strategy}",
        f"adapter={adapter}",
        f"precision={precision}",
        "data.eval=",
        "data.max_train_rows=64",
        "data.max_length=128",
        "data.packing=false",
        "train.lr=1e-3",
        "train.warmup_ratio=0",
        "train.schedule=constant",
        "output_dir=unused",
        *(["adapter.dropout=0"] if adapter != "full" else []),
    ]


def batch_of(task) -> dict:
    return task.collate([task.train[i] for i in range(4)])  # the same 4 rows on every rank


def engine_for(recipe, cfg, task, ranks):
    base = recipe.build_model(cfg, task)
    assert has_meta(base), "the recipe's model was not built on the meta device"
    built = build_trainable(
        base, cfg, task_type=task.peft_task_type, heads=task.heads, device=ranks.device, total_steps=100
    )
    return built.engine


def plain_loss(recipe, cfg, task, batch, *, quantized: bool) -> float:
    """A single-process load of the folder the ordinary way: from_pretrained in fp32 (quantized from those full
    weights for qlora when `quantized`)."""
    from transformers import AutoModelForCausalLM

    from launcher.choices import QLora

    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32)
    model.config.use_cache = False
    if quantized and isinstance(cfg.adapter, QLora):
        from launcher.worker.adapters import quantize

        quantize(model, cfg, task.heads, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def _counting_quantizations(build):
    """build(), and how many layers this rank quantized itself while it ran."""
    from launcher.worker import adapters

    real, calls = adapters.four_bit, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    adapters.four_bit = counted
    try:
        return build(), len(calls)
    finally:
        adapters.four_bit = real


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def one(recipe, folder: str, case: str, ranks: dist.Ranks) -> dict:
    from launcher.models import is_random

    strategy, adapter, precision = case.split(":")
    cfg = apply_overrides(recipe.Config(), settings(folder, strategy, adapter, precision))
    tokenizer = recipe.build_tokenizer(cfg)
    task = recipe.build_task(cfg, tokenizer)
    batch = batch_of(task)
    torch.manual_seed(cfg.seed)
    engine, quantized_here = _counting_quantizations(lambda: engine_for(recipe, cfg, task, ranks))
    counts = [0] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(counts, quantized_here)
    four_bit_layers = sum(type(m).__name__ == "Linear4bit" for m in engine.module.modules())
    still_meta = sum(1 for p in engine.module.parameters() if p.device.type == "meta")
    engine.train(False)
    with torch.no_grad():
        first = float(engine.forward(batch).loss)
    gathered = engine.gathered_state_dict(trainable_only=False)
    out = {
        "first_loss": first,
        "still_meta": still_meta,
        "quantized_per_rank": counts,
        "four_bit_layers": four_bit_layers,
    }
    if ranks.is_main:
        quantized = [n for n, t in gathered.items() if t.dtype == torch.uint8 or "quant" in n or "absmax" in n]
        plain = {source_name(n): t for n, t in gathered.items() if not any(q.rsplit(".", 1)[0] in n for q in quantized)}
        plain = {n: t for n, t in plain.items() if "lora_" not in n}
        out["hashes"] = {n: digest(t) for n, t in sorted(plain.items())}
        out["compared"] = len(plain)
        if not is_random(folder):
            files = Folder(folder)
            diffs = []
            for name, t in plain.items():
                key = files.key(name)
                if key is not None and files.shape(key) == tuple(t.shape):
                    expected = files.read(key, None).to(t.dtype)
                    diffs.append(float((t.float() - expected.float()).abs().max()))
            out["weights_checked"] = len(diffs)
            out["max_weight_diff"] = max(diffs) if diffs else None
            out["plain_loss"] = plain_loss(recipe, cfg, task, batch, quantized=False)
            out["plain_quantized_loss"] = plain_loss(recipe, cfg, task, batch, quantized=True)
        else:
            from launcher.random_folder import tensor_values

            name = "model.layers.1.mlp.up_proj.weight"
            if name in plain:
                t = plain[name]
                expected = tensor_values(name, tuple(t.shape), seed=cfg.seed, dtype=t.dtype, std=0.02)
                out["seeded_values_match"] = bool(torch.equal(plain[name], expected))
    engine.train(True)
    out["train_losses"] = [float(engine.train_step([batch]).loss) for _ in range(2)]
    saved = engine.gathered_state_dict(trainable_only=True)
    out["saved_trainable_elements"] = sum(t.numel() for t in saved.values())
    out["trainable_numel"] = engine.trainable_numel()
    del engine
    return out


def main() -> None:
    quiet_libraries()
    imports_frozen()
    limit_heap_retention()
    out_path, folder, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
    recipe = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" / "qlora_sft.py"))
    ranks = dist.init(job_from_environ())
    results = {case: one(recipe, folder, case, ranks) for case in cases}
    if ranks.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.shutdown()


if __name__ == "__main__":
    main()

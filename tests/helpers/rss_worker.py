"""Run by torchrun with 2 ranks: each given case (a cell's overrides, a micro-batch size and a sequence length)
trains a small Llama (SHAPE) for 2 steps on one micro-batch; each rank measures its peak resident memory while
training above its idle baseline (measured right before the case builds anything, every heavy library already
imported; the peak reset through /proc/self/clear_refs once the engine is built), and rank 0 reports every rank's
with what it held of its model state.

usage: torchrun --nproc_per_node 2 rss_worker.py OUT.json CASES.json  (CASES: [{cell, micro_batch, seq}...])
"""

from __future__ import annotations

import gc
import json
import sys
import traceback

import torch

from launcher.environment import quiet_libraries
from launcher.worker import dist, memory
from launcher.worker.assembly import build_trainable
from tests.helpers import imports_frozen
from tests.helpers.matrix_worker import cell_config

SHAPE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def config_for(case: dict):
    from launcher.overrides import apply_overrides

    cfg = cell_config(case["cell"], "/nonexistent", "fp32")
    return apply_overrides(cfg, [f"train.micro_batch_size={case['micro_batch']}"])


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def run_case(case: dict, ranks: dist.Ranks) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config_for(case)
    gc.collect()
    memory.release_freed_memory()
    reset_peak()
    idle, _ = memory.rss_mib()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SHAPE.items() if k != "model_type"}))
    # Trimmed between blocks as a lean CPU rank is (the heap limited in main).
    built = build_trainable(base, cfg, task_type="CAUSAL_LM", heads=[], device=ranks.device, total_steps=100, lean=True)
    engine = built.engine
    # The peak of training, not of building: this whole model partitioned after it was built is a test's shortcut
    # (a large model is built on meta and loaded in parts, each rank keeping its own: tests/test_big_models.py).
    gc.collect()
    memory.release_freed_memory()
    reset_peak()
    recorder = built.held
    g = torch.Generator().manual_seed(ranks.rank)
    ids = torch.randint(0, SHAPE["vocab_size"], (case["micro_batch"], case["seq"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for _ in range(2):
        engine.train_step([batch])
    _, peak = memory.rss_mib()
    held = recorder.largest.bytes if recorder.largest else None
    destroy = getattr(getattr(engine, "ds", None), "destroy", None)
    if destroy is not None:
        destroy()
    del engine, built, base, recorder
    gc.collect()
    peaks = dist.gather_objects(peak - idle)  # every rank's, rank 0 reports them
    return {**case, "peak_above_idle_mib": peaks, "idle_mib": idle, "held": held}


def main() -> None:
    out, cases_path = sys.argv[1:3]
    quiet_libraries()
    imports_frozen()
    memory.limit_heap_retention()  # as a lean rank does (worker.assembly)
    ranks = dist.init()
    import bitsandbytes  # noqa: F401  (imported before any baseline: a library's import is not the cell's memory)
    import deepspeed  # noqa: F401
    import peft  # noqa: F401

    with open(cases_path) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        try:
            results.append(run_case(case, ranks))
        except Exception as e:
            results.append({**case, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        if ranks.is_main:
            print(json.dumps(results[-1])[:300], flush=True)
    if ranks.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.shutdown()


if __name__ == "__main__":
    main()

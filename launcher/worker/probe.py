"""The rank side of `launcher plan --verify`: one cell trained for a few steps as a run would, measured.

usage: torchrun --nproc_per_node N -m launcher.worker.probe SPEC.json OUT.json

SPEC (written by launcher.planning.probe): {"config": the model's config.json, "run": the cell's RunConfig (to_dict),
"micro_batch": B, "seq_len": S, "steps": K}. The model is built on the meta device and each rank loads its own part
with seeded random values (the large-model path of a run: launcher.worker.weights), the adapter and the strategy are
the run's own (worker.assembly), and each step trains on one micro-batch of random tokens of the full
length. Rank 0 writes what the ranks held of their model state, the most of it any rank held
(worker.holdings, between the last backward and the optimizer step), and their peak resident memory while training
above the baseline each had before building anything.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback

import torch


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the current resident size: the peak from here on
    except OSError:
        pass


def probe(spec: dict, ranks) -> dict:
    from launcher.config import RunConfig
    from launcher.overrides import from_dict
    from launcher.planning.counting import model_class
    from launcher.worker import dist, memory
    from launcher.worker.assembly import adapt, wrap
    from launcher.worker.weights import Weights, empty_weights

    cfg = from_dict(RunConfig, spec["run"])
    gc.collect()
    memory.release_freed_memory()
    _reset_peak()
    idle, _ = memory.rss_mib()
    t0 = time.time()
    auto, hf_config = model_class(spec["config"])
    with empty_weights():
        base = auto.from_config(hf_config)
    weights = Weights(None, seed=cfg.seed, std=float(getattr(hf_config, "initializer_range", 0.02) or 0.02))
    # As a large model's rank: the heap limited (main) and trimmed between blocks on a CPU. The run's length is not
    # known here: AdaLoRA gets its shortest schedule, the learning rate one of 100 steps.
    adapted = adapt(base, cfg, task_type="CAUSAL_LM", heads=[], device=ranks.device, weights=weights, lean=True)
    built = wrap(adapted, cfg, device=ranks.device, total_steps=100, local_world_size=ranks.world_size)
    engine = built.engine
    load_seconds = time.time() - t0
    _, load_peak = memory.rss_mib()
    gc.collect()
    memory.release_freed_memory()
    _reset_peak()  # training's peak, not loading's (a whole 4-bit layer is quantized on load, then freed)
    recorder = built.held
    g = torch.Generator().manual_seed(1000 + ranks.rank)
    vocab = int(hf_config.vocab_size)
    ids = torch.randint(0, vocab, (spec["micro_batch"], spec["seq_len"]), generator=g).to(ranks.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    losses, step_seconds = [], []
    for _ in range(spec["steps"]):
        t = time.time()
        losses.append(float(engine.train_step([batch]).loss))
        step_seconds.append(time.time() - t)
    _, peak = memory.rss_mib()
    held = recorder.largest.bytes if recorder.largest is not None else None
    mine = {
        "rank": ranks.rank,
        "held": held,
        "peak_above_idle": int((peak - idle) * 2**20),
        "idle": int(idle * 2**20),
        "load_peak_above_idle": int((load_peak - idle) * 2**20),
        "load_seconds": round(load_seconds, 2),
        "step_seconds": [round(s, 3) for s in step_seconds],
        "losses": losses,
    }
    if torch.cuda.is_available() and ranks.device.type == "cuda":
        mine["max_memory_allocated"] = torch.cuda.max_memory_allocated(ranks.device)
    return {"ranks": dist.gather_objects(mine)}


def main() -> None:
    from launcher.environment import quiet_libraries
    from launcher.worker import dist, memory

    spec_path, out_path = sys.argv[1:3]
    quiet_libraries()
    memory.limit_heap_retention()  # as a lean rank of a run does (worker.assembly)
    ranks = dist.init()
    # Imported before the baseline: a library's import is not the cell's memory (ZeRO's module brings DeepSpeed).
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401

    import launcher.worker.strategies.zero  # noqa: F401

    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = probe(spec, ranks)
    except Exception as e:  # the launcher side reports it; the trace goes with it
        result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    if ranks.is_main:
        from launcher.files import write_atomic

        write_atomic(out_path, json.dumps(result))
    dist.shutdown()


if __name__ == "__main__":
    main()

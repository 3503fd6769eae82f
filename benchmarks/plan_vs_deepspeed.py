"""The planner's model-state bytes beside DeepSpeed's own estimators, and a CPU measurement that says which is right.

1. Full fine-tuning of the Llama-3-8B shape (bf16) on one node of 8 GPUs under ZeRO-2 and ZeRO-3, with and without
   optimizer offload: launcher.planning.sizing's bytes per GPU and per node beside
   `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (additional_buffer_factor=1).
2. The same cells measured: the tiny Llama of tests/helpers/matrix_worker.py trained in bf16 by 2 gloo ranks; what
   rank 0 holds between backward and the optimizer step (holdings, each storage once) per term, beside the planner
   and DeepSpeed's formula for that model. Prints bytes per parameter.

usage: python benchmarks/plan_vs_deepspeed.py [--no-measure]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CELLS = {
    "zero2": ["strategy=zero2", "adapter=full", "optimizer=adamw"],
    "zero3": ["strategy=zero3", "adapter=full", "optimizer=adamw"],
    "zero2+offload": ["strategy=zero2", "strategy.offload_optimizer=cpu", "adapter=full", "optimizer=cpu_adam"],
    "zero3+offload": ["strategy=zero3", "strategy.offload_optimizer=cpu", "adapter=full", "optimizer=cpu_adam"],
}


def deepspeed_estimate(name: str, params: int, largest: int, gpus: int) -> tuple[float, float]:
    """(GPU bytes per rank, CPU bytes per node) by DeepSpeed's estimators for one node of `gpus`."""
    import io
    from contextlib import redirect_stdout

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    offload = name.endswith("offload")
    with redirect_stdout(io.StringIO()):
        if name.startswith("zero2"):
            cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus, 1, offload, additional_buffer_factor=1.0)
        else:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                params, largest, gpus, 1, offload, False, True, additional_buffer_factor=1.0
            )
    return gpu, cpu


def planned(name: str, counts, world: int, precision: str = "bf16"):
    from launcher.config import RunConfig
    from launcher.overrides import apply_overrides
    from launcher.planning.sizing import model_state

    return model_state(counts, apply_overrides(RunConfig(model="x"), [f"precision={precision}", *CELLS[name]]), world)


def measure(precision: str) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cells = Path(tmp) / "cells.json"
        cells.write_text(json.dumps(list(CELLS.values())))
        out = Path(tmp) / "out.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        worker = str(ROOT / "tests/helpers/matrix_worker.py")
        argv = ["torchrun", "--standalone", "--nproc_per_node", "2", worker, str(out), "llama", str(cells), precision]
        subprocess.run(argv, check=True, cwd=tmp, env=env, stdout=subprocess.DEVNULL)
        results = json.loads(out.read_text())
    return {name: r for name, r in zip(CELLS, results, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-measure", action="store_true", help="only the 8B table (no CPU run)")
    args = parser.parse_args()
    from launcher.planning.counting import count, load_shape
    from tests.helpers.matrix_worker import LLAMA_SHAPE

    GiB = 2**30
    c = count(load_shape("llama-3-8b"))
    print(f"Llama-3-8B shape, full fine-tuning, bf16, 1 node x 8 GPUs ({c.total / 1e9:.2f}B parameters)")
    print(f"{'':15} {'ours GPU/rank':>14} {'DeepSpeed':>10} {'ratio':>6}   {'ours CPU/node':>14} {'DeepSpeed':>10}")
    for name in CELLS:
        ours = planned(name, c, 8)
        gpu, cpu = deepspeed_estimate(name, c.total, c.largest_block, 8)
        print(
            f"{name:15} {ours.on('gpu') / GiB:11.2f} GiB {gpu / GiB:6.2f} GiB {ours.on('gpu') / gpu:6.3f}"
            f"   {8 * ours.on('cpu') / GiB:10.2f} GiB {cpu / GiB:6.2f} GiB"
        )
        print(f"{'':15} ours by term (GiB/rank): " + ", ".join(f"{t} {ours.term(t) / GiB:.2f}" for t in ours.bytes))
    if args.no_measure:
        return
    tiny = count(LLAMA_SHAPE)
    print(f"\nmeasured: the tiny Llama ({tiny.total} parameters) in bf16, 2 gloo ranks; bytes per parameter per rank")
    measured = measure("bf16")
    for name, r in measured.items():
        if "error" in r:
            print(f"{name}: {r['error']}")
            continue
        held = {t: sum(v.values()) for t, v in r["held"].items()}
        ours = planned(name, tiny, 2)
        gpu, _ = deepspeed_estimate(name, tiny.total, tiny.largest_block, 2)
        terms = ", ".join(f"{t} {held[t] / tiny.total:.2f}/{ours.term(t) / tiny.total:.2f}" for t in held)
        print(
            f"{name:15} held {sum(held.values()) / tiny.total:.2f}, ours {ours.total() / tiny.total:.2f}, "
            f"DeepSpeed (GPU part) {gpu / tiny.total:.2f}   (held/ours: {terms})"
        )


if __name__ == "__main__":
    main()

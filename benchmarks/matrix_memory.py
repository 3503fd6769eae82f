"""Per-rank memory of the composition matrix, measured: what each rank really holds, cell by cell.

For a 6-layer, 512-wide Llama-shaped model on 2 ranks, each cell trains 2 steps in its own `torchrun` (so the
peak RSS is the cell's own) and records, per rank, the bytes (numel * element_size, each tensor once however
many references reach it) of:
  params      the module's parameters as the rank holds them (a ZeRO-3 partition, an FSDP2 shard, the whole
              model under DDP; a 4-bit base counts its packed weights and quantization constants)
  grads       the most gradient bytes alive at once: sampled as each gradient lands in backward and as the
              optimizer steps (module-side and optimizer-side gradients)
  optimizer   optimizer-state tensors after the step, plus master copies the optimizer steps instead of the
              module's parameters (DeepSpeed's fp32 partitions under bf16)
Then it checks the orderings the design promises: ZeRO-3 < ZeRO-2 < ZeRO-1 < DDP for model states, 8-bit
optimizer states about 4x smaller than 32-bit ones, a 4-bit (QLoRA) base about 3.5x smaller than a bf16 base.
Exit code 1 if one does not hold.

usage: python benchmarks/matrix_memory.py [--layers 6] [--hidden 512] [--vocab 1024]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides. Full fine-tuning shows the strategies' differences (every parameter has states).
CELLS = {
    "ddp full adamw": ["strategy=ddp", "adapter=full", "optimizer=adamw"],
    "zero1 full adamw": ["strategy=zero1", "adapter=full", "optimizer=adamw"],
    "zero2 full adamw": ["strategy=zero2", "adapter=full", "optimizer=adamw"],
    "zero3 full adamw": ["strategy=zero3", "adapter=full", "optimizer=adamw"],
    "fsdp full adamw": ["strategy=fsdp", "adapter=full", "optimizer=adamw"],
    "ddp full adamw8bit": ["strategy=ddp", "adapter=full", "optimizer=adamw8bit"],
    "zero2+offload full cpu_adam": [
        "strategy=zero2",
        "strategy.offload_optimizer=cpu",
        "adapter=full",
        "optimizer=cpu_adam",
    ],
    "zero2 lora bf16": ["strategy=zero2", "adapter=lora", "optimizer=adamw", "precision=bf16"],
    "zero2 qlora bf16": ["strategy=zero2", "adapter=qlora", "optimizer=adamw", "precision=bf16"],
    "zero3 qlora bf16": ["strategy=zero3", "adapter=qlora", "optimizer=adamw", "precision=bf16"],
}


# ----------------------------------------------------------------------------------------------- worker


def _storages(tensors) -> dict[tuple[int, int], int]:
    """(data_ptr, numel) -> numel * element_size of the distinct tensors in `tensors` (a tensor reached twice,
    e.g. a parameter and the optimizer's reference to it, counts once)."""
    out = {}
    for t in tensors:
        if t is None:
            continue
        local = getattr(t, "_local_tensor", None)  # DTensor: this rank's shard
        t = local if local is not None else t
        if t.numel():
            out[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return out


def _quant_state_tensors(module):
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None) or getattr(m, "quant_state", None)
        if state is None or not hasattr(state, "as_dict"):
            continue
        yield from (v for v in state.as_dict().values() if hasattr(v, "untyped_storage"))


def measure(model_args: dict, overrides: list[str]) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.config import RunConfig
    from launcher.environment import quiet_libraries
    from launcher.overrides import apply_overrides
    from launcher.worker import dist
    from launcher.worker.assembly import build_trainable

    quiet_libraries()
    ranks = dist.init()
    cfg = apply_overrides(
        RunConfig(model="bench"),
        [*overrides, "train.micro_batch_size=2", "train.lr=1e-4", "output_dir=unused"],
    )
    if "precision=bf16" not in overrides:
        cfg.precision = "fp32"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=model_args["vocab"],
        hidden_size=model_args["hidden"],
        intermediate_size=model_args["hidden"] * 8 // 3 // 32 * 32,
        num_hidden_layers=model_args["layers"],
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    # The run's assembly; the heap as glibc's defaults leave it (lean=False), what this benchmark has always measured.
    engine = build_trainable(
        base, cfg, task_type="CAUSAL_LM", heads=[], device=ranks.device, total_steps=10, lean=False
    ).engine
    inner = engine.optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    module_params = list(engine.module.parameters())
    seen: dict[str, int] = {"grads": 0}

    def sample_grads(*_):
        # The peak of what is alive at once, sampled whenever a gradient lands (backward) and when each param
        # group steps (DeepSpeed steps one group at a time, freeing the previous group's gradients).
        stepped = [p for g in inner.param_groups for p in g["params"]]
        alive = _storages([p.grad for p in module_params] + [p.grad for p in stepped])
        seen["grads"] = max(seen["grads"], sum(alive.values()))

    def before_step(opt, *_):
        sample_grads()

    def after_step(opt, *_):
        states = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        held = _storages(module_params + [getattr(p, "ds_tensor", None) for p in module_params])
        stepped = _storages(p for g in opt.param_groups for p in g["params"])
        masters = {k: v for k, v in stepped.items() if k not in held}  # copies the optimizer steps instead
        seen["optimizer"] = sum(_storages(states).values()) + sum(masters.values())

    for p in module_params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(sample_grads)
    inner.register_step_pre_hook(before_step)
    inner.register_step_post_hook(after_step)
    g = torch.Generator().manual_seed(ranks.rank)
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=g).to(ranks.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(2):
        engine.train_step([batch])
    params = _storages(
        module_params
        + [getattr(p, "ds_tensor", None) for p in module_params]
        + list(_quant_state_tensors(engine.module))
    )
    frozen = _storages(
        [p for p in module_params if not p.requires_grad]
        + [getattr(p, "ds_tensor", None) for p in module_params if not p.requires_grad]
        + list(_quant_state_tensors(engine.module))
    )
    result = {
        "rank": ranks.rank,
        "params": sum(params.values()),
        "frozen_base": sum(frozen.values()),
        "grads": seen.get("grads", 0),
        "optimizer": seen.get("optimizer", 0),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in module_params),
    }
    gathered = dist.gather_objects(result)
    if ranks.is_main:
        print("RESULT " + json.dumps(gathered), flush=True)
    engine = model = base = inner = None  # noqa: F841 (dropped so the collector can free them)
    module_params = []
    gc.collect()  # DDP's reducer must go before its process group, or its destructor waits forever
    dist.shutdown()
    return result


# ----------------------------------------------------------------------------------------------- driver


def run_cell(name: str, overrides: list[str], args) -> list[dict]:
    model_args = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        "--worker",
        json.dumps({"model": model_args, "overrides": overrides}),
    ]
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    # A small vocabulary keeps the (unquantized) embeddings from dominating a 6 x 512 model, as in real LLMs.
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        measure(spec["model"], spec["overrides"])
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)  # the table needs more than a pipe's 80 columns
    results = {}
    for name, overrides in CELLS.items():
        console.print(f"[dim]measuring {name} ...[/]")
        results[name] = run_cell(name, overrides, args)
    table = Table(
        title=f"per-rank MiB, rank 0 (rank 1): Llama {args.layers} layers x {args.hidden}, vocab {args.vocab}, 2 ranks",
        title_justify="left",
    )
    for col in ("cell", "params", "grads", "optimizer", "model states", "peak RSS"):
        table.add_column(col, justify="left" if col == "cell" else "right")
    states = {}
    for name, ranks in results.items():
        r0, r1 = ranks
        total = [r["params"] + r["grads"] + r["optimizer"] for r in ranks]
        states[name] = total[0]

        def both(key, r0=r0, r1=r1):
            return f"{mib(r0[key])} ({mib(r1[key])})"

        table.add_row(
            name,
            both("params"),
            both("grads"),
            both("optimizer"),
            f"{mib(total[0])} ({mib(total[1])})",
            both("peak_rss"),
        )
    console.print(table)

    checks = []
    order = ["zero3 full adamw", "zero2 full adamw", "zero1 full adamw", "ddp full adamw"]
    values = [states[n] for n in order]
    checks.append(
        (
            "model states: ZeRO-3 < ZeRO-2 < ZeRO-1 < DDP",
            all(a < b for a, b in zip(values, values[1:])),
            " < ".join(f"{mib(v)}" for v in values) + " MiB",
        )
    )
    ratio = results["ddp full adamw"][0]["optimizer"] / results["ddp full adamw8bit"][0]["optimizer"]
    checks.append(("8-bit optimizer states about 4x smaller than 32-bit", 3.3 <= ratio <= 4.2, f"{ratio:.2f}x"))
    base = results["zero2 lora bf16"][0]["frozen_base"] / results["zero2 qlora bf16"][0]["frozen_base"]
    # Embeddings, lm_head and norms stay in bf16 under QLoRA; the linear layers shrink 2 bytes -> ~0.52 bytes.
    checks.append(
        ("QLoRA base about 3.5x smaller than a bf16 base (frozen weights)", 3.0 <= base <= 4.0, f"{base:.2f}x")
    )
    linear = _linear_ratio(results, args)
    checks.append(("  ... the quantized linear layers alone", 3.3 <= linear <= 4.0, f"{linear:.2f}x"))
    failed = 0
    for what, ok, figure in checks:
        failed += not ok
        console.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {what}: {figure}")
    return 1 if failed else 0


def _linear_ratio(results: dict, args) -> float:
    """bf16 vs 4-bit bytes of the linear layers only: take away the (equal) unquantized frozen parts."""
    hidden, vocab, layers = args.hidden, args.vocab, args.layers
    unquantized = (2 * vocab * hidden + (2 * layers + 1) * hidden) * 2  # embed, lm_head, norms in bf16
    bf16 = results["zero2 lora bf16"][0]["frozen_base"] - unquantized
    four = results["zero2 qlora bf16"][0]["frozen_base"] - unquantized
    return bf16 / four


if __name__ == "__main__":
    sys.exit(main())

"""QLoRA of a model larger than a rank's memory in full precision: the Llama-3-8B shape on this 24 GB, 2-core machine.

Writes (once) a random-weight bf16 safetensors folder of the shape (about 16 GB for llama-3-8b; the launcher's
writer, tensor by tensor), then for each strategy runs `launcher run recipes/qlora_sft.py --nproc 2` on it: built on
the meta device, each linear layer read and quantized on load, everything else loaded into each rank's shard;
sequence length 128, micro-batch 1, the same two examples every step (a repeated batch), activation checkpointing.
Prints per rank: peak RSS after loading and for the whole run, load time, seconds per step, the model state each
rank held beside `launcher plan`'s for the same run (per term); and the losses. Checks: finite, falling loss; an
adapter whose saved tensors hold every trained element; the held model state within 2% of the plan. Exit 1 if one
fails.
The fp32 copy of the model it never builds would be 4 bytes per parameter (32 GB for llama-3-8b).

usage: python benchmarks/big_model.py [--shape llama-3-8b] [--folder /tmp/llama-3-8b-random] [--steps 3]
                                      [--strategies fsdp zero3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_folder(shape: str, folder: Path) -> None:
    if (folder / "model.safetensors.index.json").exists():
        print(f"using {folder}")
        return
    t = time.time()
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/write_random_model.py"), shape, str(folder), "--dtype", "bf16"], check=True
    )
    print(f"wrote {folder} in {time.time() - t:.0f}s")


def run_one(folder: Path, strategy: str, steps: int, precision: str, out: Path) -> dict:
    cmd = [
        str(Path(sys.executable).parent / "launcher"),
        "run",
        str(ROOT / "recipes/qlora_sft.py"),
        "--nproc",
        "2",
        f"model={folder}",
        f"strategy={strategy}",
        "adapter=qlora",
        f"precision={precision}",
        "activation_checkpointing=true",
        f"data.train={out.parent / 'two_rows.jsonl'}",  # one example per rank: every step sees the same batch
        "data.max_length=128",
        "data.packing=false",
        "data.eval=",
        "data.generations=0",
        "train.micro_batch_size=1",
        f"train.max_steps={steps}",
        "train.lr=1e-3",
        "train.warmup_ratio=0",
        "train.schedule=constant",
        "train.log_every=1",
        f"output_dir={out}",
        "overwrite=true",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
        {"instruction": "What is two plus two?", "input": "", "output": "Two plus two is four."},
    ]
    (out.parent / "two_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - t
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return {"strategy": strategy, "rc": proc.returncode, "wall": wall}
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    times = [r["time"] for r in train]
    step_s = [b - a for a, b in zip(times, times[1:])]
    from safetensors.torch import load_file

    adapter = out / "adapter" / "adapter_model.safetensors"
    saved = sum(t.numel() for t in load_file(str(adapter)).values())  # bytes really written, not a file's existence
    return {
        "strategy": strategy,
        "rc": 0,
        "wall": wall,
        "state": planned_and_held(folder, out, summary),
        "peak": summary["peak_rss_mib_per_rank"],
        "loaded": summary["peak_rss_mib_loaded_per_rank"],
        "before": summary["rss_mib_before_model_per_rank"],
        "load_s": summary["model_load_seconds"],
        "step_s": step_s,
        "losses": [r["loss"] for r in train],
        "trainable": summary["trainable_parameters"],
        "saved_elements": saved,
        "adapter_bytes": adapter.stat().st_size,
    }


def planned_and_held(folder: Path, out: Path, summary: dict) -> dict:
    """The model state `launcher plan` gives this run (its own resolved config, 2 CPU ranks, 128 tokens) beside what
    each rank held (summary.json's model_state_bytes_per_rank), per term."""
    from launcher.plan import read_plan
    from launcher.planning.counting import cached_count, planning_config
    from launcher.planning.rows import Machine, plan_row
    from launcher.planning.sizing import TERMS
    from launcher.recipe import Recipe

    cfg = read_plan(str(out / "config.json"), Recipe.load(str(ROOT / "recipes/qlora_sft.py"))).config
    config = planning_config(str(folder))
    row = plan_row("run", [], cfg, cached_count(config), config, Machine(1, 2), 128, gpu=False)
    held = summary["model_state_bytes_per_rank"]
    return {
        "planned": {t: row.state.term(t) for t in TERMS},
        "held": [{t: sum((h or {}).get(t, {}).values()) for t in TERMS} for h in held],
        "planned_rank_total": row.rank_bytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--folder", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["fsdp", "zero3"])
    parser.add_argument("--precision", default="fp32", help="fp32 on CPU (these CPUs emulate bf16)")
    parser.add_argument("--out", default="/tmp/big_model_runs")
    args = parser.parse_args()
    folder = Path(args.folder or f"/tmp/{args.shape}-random")
    write_folder(args.shape, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    size = index["metadata"]["total_size"]
    print(f"{args.shape}: {size / 1e9:.1f} GB on disk (bf16); an fp32 copy would be {2 * size / 2**30:.1f} GiB")
    failures = []
    results = []
    for strategy in args.strategies:
        r = run_one(folder, strategy, args.steps, args.precision, Path(args.out) / strategy)
        results.append(r)
        if r["rc"] != 0:
            failures.append(f"{strategy}: exit {r['rc']}")
            continue
        print(
            f"{strategy}: peak RSS per rank {r['peak']} MiB (after loading {r['loaded']} MiB); "
            f"load {r['load_s']:.0f}s; "
            f"s/step {[round(s, 1) for s in r['step_s']]}; losses {[round(x, 4) for x in r['losses']]}; "
            f"adapter {r['saved_elements']:,} elements ({r['adapter_bytes'] / 2**20:.1f} MiB), "
            f"{r['trainable']:,} trained; wall {r['wall']:.0f}s"
        )
        planned, held = r["state"]["planned"], r["state"]["held"]
        for rank, h in enumerate(held):
            ratio = sum(h.values()) / sum(planned.values())
            print(
                f"  rank {rank} model state: planned {sum(planned.values()) / 2**30:.3f} GiB, held "
                f"{sum(h.values()) / 2**30:.3f} GiB ({ratio:.3f}); "
                + ", ".join(f"{t} {h[t] / 2**20:.1f}/{planned[t] / 2**20:.1f} MiB" for t in planned)
                + f"; peak RSS above the rank before its model {r['peak'][rank] - r['before'][rank]:.0f} MiB, "
                f"planned {r['state']['planned_rank_total'] / 2**20:.0f} MiB"
            )
            if abs(ratio - 1) > 0.02:
                failures.append(f"{strategy}: rank {rank} held {ratio:.3f} of the planned model state")
        losses = r["losses"]
        if not all(x == x and abs(x) != float("inf") for x in losses) or not losses[-1] < losses[0]:
            failures.append(f"{strategy}: loss not finite and falling: {losses}")
        if r["saved_elements"] != r["trainable"] or r["saved_elements"] == 0:
            failures.append(f"{strategy}: adapter holds {r['saved_elements']} elements, {r['trainable']} trained")
    print(json.dumps(results))
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

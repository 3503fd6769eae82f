"""qlora_sft on Alpaca with and without packing: real (non-padding) tokens/s and peak RSS per rank.

    python benchmarks/sft_packing.py                  # 2 ranks, QLoRA on random:llama-tiny, 30 steps each
    python benchmarks/sft_packing.py --steps 60 --model random:qwen2-tiny

Three runs of the same recipe, same model, adapter, micro-batch size and max length:
  packed              examples packed into rows of max_length tokens (position ids restart per example)
  padded              one example per row, random batches padded to their longest (the HF Trainer default)
  padded+grouped      one example per row, batches of similar length (our default without packing)
Target: packing raises real tokens/s by at least 1.5x over `padded`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "datasets" / "alpaca"

CASES = {
    "packed": ["data.packing=true"],
    "padded": ["data.packing=false", "data.group_by_length=false"],
    "padded+grouped": ["data.packing=false", "data.group_by_length=true"],
}


def run_case(name: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / name.replace("+", "-")
    settings = [
        f"model={args.model}",
        f"adapter={args.adapter}",
        f"data.train={ALPACA / 'train.jsonl'}",
        "data.eval=",
        f"data.max_length={args.max_length}",
        f"tokenizer_vocab={args.vocab}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.batch}",
        "train.log_every=10",
        f"output_dir={out}",
        "overwrite=true",  # a benchmark is meant to be run again into the same folders
        *CASES[name],
    ]
    cmd = [sys.executable, "-m", "launcher", "run", str(ROOT / "recipes" / "qlora_sft.py"), "--nproc", str(args.nproc)]
    print("$", " ".join(cmd + settings), flush=True)
    proc = subprocess.run(cmd + settings, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{name}: the run failed with exit code {proc.returncode}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:llama-tiny")
    parser.add_argument("--adapter", default="qlora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-sft"))
    args = parser.parse_args()
    if not ALPACA.is_dir():
        sys.exit(f"{ALPACA} is absent: this benchmark needs the shared Alpaca copy")
    results = {name: run_case(name, args) for name in CASES}
    print(
        f"\nAlpaca, {args.model} + {args.adapter}, {args.nproc} ranks, micro-batch {args.batch} rows, "
        f"max_length {args.max_length}, {args.steps} steps"
    )
    print(f"{'case':16} {'real tokens/s':>14} {'rows/s':>10} {'real tokens':>12} {'peak RSS MiB/rank':>20}")
    for name, s in results.items():
        rss = "/".join(f"{x:.0f}" for x in s["peak_rss_mib_per_rank"])
        print(
            f"{name:16} {s['train_tokens_per_s']:14.1f} {s['train_samples_per_s']:10.2f} "
            f"{s['train_tokens']:12,} {rss:>20}"
        )
    gain = results["packed"]["train_tokens_per_s"] / results["padded"]["train_tokens_per_s"]
    grouped = results["packed"]["train_tokens_per_s"] / results["padded+grouped"]["train_tokens_per_s"]
    print(
        f"{'PASS' if gain >= 1.5 else 'FAIL'} packing: {gain:.2f}x the real tokens/s of padded batches "
        f"(target >= 1.5x); "
        f"{grouped:.2f}x length-grouped ones"
    )
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

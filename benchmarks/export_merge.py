"""`launcher export --merge` of a QLoRA run on a model folder: peak memory of the streamed merge.

Writes (once) a random-weight bf16 safetensors folder of a shipped shape (scripts/write_random_model.py), trains
QLoRA on it for one step with a checkpoint (`launcher run recipes/qlora_sft.py`, 1 process), then merges that
checkpoint into the dequantized base (`launcher export CHECKPOINT --out DIR --merge`) and prints the export's peak
RSS (the child's ru_maxrss) and time beside the model's fp32 size and the export's shard size: the merge reads,
dequantizes and writes one tensor at a time, so its peak is the process itself plus a shard, not the model.
Checks: the merged folder holds every tensor in bf16 and its size is 2 bytes per parameter. Exit 1 if not.

usage: python benchmarks/export_merge.py [--shape llama-3.2-1b] [--folder /tmp/llama-3.2-1b-random] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="where the run and the export go (default: a temp dir)")
    args = parser.parse_args()
    folder = args.folder or Path(f"/tmp/{args.shape}-random")
    if not (folder / "model.safetensors.index.json").exists():
        t = time.time()
        subprocess.run(
            [sys.executable, str(ROOT / "scripts/write_random_model.py"), args.shape, str(folder), "--dtype", "bf16"],
            check=True,
        )
        print(f"wrote {folder} in {time.time() - t:.0f}s")
    work = args.work or Path(tempfile.mkdtemp(prefix="export-merge-"))
    run_dir, merged = work / "run", work / "merged"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(merged, ignore_errors=True)
    launcher = [sys.executable, "-m", "launcher"]
    settings = [
        f"model={folder}",
        "train.max_steps=1",
        "checkpoint.every_steps=1",
        "train.micro_batch_size=1",
        "data.max_length=128",
        "data.packing=false",
        "data.eval=",
        "data.generations=0",
        "data.max_train_rows=8",
        f"output_dir={run_dir}",
    ]
    t = time.time()
    subprocess.run([*launcher, "run", str(ROOT / "recipes/qlora_sft.py"), *settings], check=True)
    print(f"trained 1 step with a checkpoint in {time.time() - t:.0f}s")
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    t = time.time()
    # Measured in a process of its own, whose only child is the export (ru_maxrss of children: the largest one).
    measure = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    measure += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    export = [*launcher, "export", str(checkpoint), "--out", str(merged), "--merge"]
    done = subprocess.run([sys.executable, "-c", measure, *export], check=True, capture_output=True, text=True)
    print(done.stdout.rstrip().rsplit("\n", 1)[0])
    peak = int(done.stdout.strip().splitlines()[-1])  # KiB
    seconds = time.time() - t
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    written = sum(f.stat().st_size for f in merged.glob("model-*.safetensors"))
    from safetensors import safe_open

    params, dtypes = 0, set()
    for shard in merged.glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape, dtypes = sl.get_shape(), dtypes | {sl.get_dtype()}
                n = 1
                for d in shape:
                    n *= d
                params += n
    from launcher.worker.export import EXPORT_SHARD_MB

    fp32 = params * 4 / 2**20
    print(
        json.dumps(
            {
                "shape": args.shape,
                "parameters": params,
                "fp32_copy_mib": round(fp32),
                "merged_mib": round(written / 2**20),
                "shards": len(set(index["weight_map"].values())),
                "shard_mib": EXPORT_SHARD_MB,
                "export_seconds": round(seconds),
                "export_peak_rss_mib": round(peak / 1024),
                "dtypes": sorted(dtypes),
                "model_type": config.get("model_type"),
            },
            indent=2,
        )
    )
    ok = dtypes == {"BF16"} and abs(written - 2 * params) < 2**20
    if not ok:
        print("FAILED: the merged folder is not every tensor in bf16", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

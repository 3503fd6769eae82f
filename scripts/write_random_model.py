"""Write a random-weight model folder of a shipped shape (safetensors shards + index, config, tokenizer) without
holding the model in memory: for tests and benchmarks of loading real folders.

    python scripts/write_random_model.py llama-3.2-1b /data/llama-1b --dtype bf16
    launcher run recipes/qlora_sft.py model=/data/llama-1b ...
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from launcher.errors import USAGE_EXIT_CODE, ConfigError
from launcher.models import random_shapes
from launcher.random_folder import DTYPES, write_random_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help=f"one of {', '.join(random_shapes())}")
    parser.add_argument("folder", help="the folder to create (must not exist)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=int, default=2000, help="size of each safetensors file (default 2000)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the real model's")
    args = parser.parse_args()
    t0 = time.time()
    try:
        index = write_random_folder(
            args.shape,
            args.folder,
            dtype=args.dtype,
            seed=args.seed,
            shard_mb=args.shard_mb,
            vocab_size=args.vocab_size,
            say=lambda line: print(f"{time.time() - t0:6.1f}s  {line}", flush=True),
        )
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return USAGE_EXIT_CODE
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = index["metadata"]["total_size"] / 2**30
    print(f"{args.folder}: {size:.2f} GB of weights in {time.time() - t0:.0f}s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

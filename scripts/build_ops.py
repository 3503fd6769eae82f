"""Compile the DeepSpeed CPU ops a CPU machine uses (CPU Adam for ZeRO-Offload, the shared-memory collectives
every ZeRO run loads) once, at setup, into this environment's own build folder (launcher.environment), instead of
in the first run that needs them (about 30 s each on 2 cores). GPU machines build their ops on first use. An op
already built is left alone without importing deepspeed (torch rebuilds it on first use if its sources changed)."""

from __future__ import annotations

import os
import sys
import time

from launcher.environment import quiet_libraries


def cpu_adam() -> None:
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)


def shm_comm() -> None:
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


OPS = {"cpu_adam": cpu_adam, "deepspeed_shm_comm": shm_comm}
"""Each op by the name torch builds it under: TORCH_EXTENSIONS_DIR/NAME/NAME.so."""


def main() -> int:
    quiet_libraries()
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        print("build_ops: not a CPU machine; DeepSpeed builds its ops on first use")
        return 0
    folder = os.environ["TORCH_EXTENSIONS_DIR"]
    for name, build in OPS.items():
        if os.path.isfile(os.path.join(folder, name, f"{name}.so")):
            continue
        start = time.time()
        build()
        print(f"build_ops: {name} ready in {folder} ({time.time() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

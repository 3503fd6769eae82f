"""Compile the DeepSpeed CPU ops a CPU machine uses (CPU Adam for ZeRO-Offload, the shared-memory collectives
every ZeRO run loads) once, at setup, into this environment's own build folder (launcher.environment), instead of
in the first run that needs them (about 30 s each on 2 cores). GPU machines build their ops on first use."""

from __future__ import annotations

import os
import sys
import time

from launcher.environment import quiet_libraries


def main() -> int:
    quiet_libraries()
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        print("build_ops: not a CPU machine; DeepSpeed builds its ops on first use")
        return 0
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder import CPUAdamBuilder

    for name, build in (("cpu_adam", lambda: CPUAdamBuilder().load(verbose=False)), ("shm_comm", build_shm_op)):
        start = time.time()
        build()
        print(f"build_ops: {name} ready in {os.environ['TORCH_EXTENSIONS_DIR']} ({time.time() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Create .venv with torch pinned first (the CPU wheel on a CPU machine, the CUDA build where pip serves it),
# then install the project with its test extra. Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch before anything else: an unpinned torch pulled in by another package would fetch GBs of CUDA wheels.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
if ! .venv/bin/python -c "import launcher, deepspeed, peft, bitsandbytes, datasets, rich, pytest" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.launcher-installed ]; then
  echo "setup: installing launcher and its dependencies"
  "${PIP[@]}" install -e ".[test]"
  touch .venv/.launcher-installed
fi
# DeepSpeed's CPU ops, compiled once here rather than inside the first run (or test) that needs them.
.venv/bin/python scripts/build_ops.py 2>/dev/null | grep -v "^DeepSpeed" \
  || echo "setup: DeepSpeed's CPU ops were not prebuilt (they build on first use)"
# openssh and pdsh for multi-node launches and their tests (installed only where we are root; else it says so).
bash scripts/system_packages.sh
# chromium for the headless check of `launcher report`'s page (optional).
bash scripts/browser.sh
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"

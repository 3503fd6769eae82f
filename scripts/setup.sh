#!/usr/bin/env bash
# The Python environment and nothing else: .venv with torch pinned first (the CPU wheel on a CPU machine, the CUDA
# build where pip serves it), the project with its test extra, DeepSpeed's CPU ops compiled once. No system package:
# those only the long test tier uses are installed by scripts/system_packages.sh, which `make test-long` runs.
# Safe to re-run, and quick when there is nothing to do (it imports nothing heavy to find out).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# Installed versions read from package metadata, not by importing the packages (an import of them all takes seconds).
installed() { .venv/bin/python - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    found = {name: version(name) for name in sys.argv[1:]}
except PackageNotFoundError:
    sys.exit(1)
print(found.get("torch", ""))
EOF
}
# torch before anything else: an unpinned torch pulled in by another package would fetch GBs of CUDA wheels.
torch_found=$(installed torch 2>/dev/null || true)
if [ "${torch_found%%+*}" != "$TORCH_VERSION" ]; then
  echo "setup: installing torch==$TORCH_VERSION"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
if ! installed launcher deepspeed peft bitsandbytes datasets rich pytest ruff >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.launcher-installed ]; then
  echo "setup: installing launcher and its dependencies"
  "${PIP[@]}" install -e ".[test]"
  touch .venv/.launcher-installed
fi
# DeepSpeed's CPU ops, compiled once here rather than inside the first run (or test) that needs them.
if built=$(.venv/bin/python scripts/build_ops.py 2>/dev/null); then
  [ -z "$built" ] || grep -v "^DeepSpeed" <<<"$built" || true
else
  echo "setup: DeepSpeed's CPU ops were not prebuilt (they build on first use)"
fi
echo "setup: ready (torch $(installed torch))"

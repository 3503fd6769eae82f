# What a new user needs (see README): `make demo`, then `make test`; `make test-long` for the long checks.
SHELL := /bin/bash
VENV := .venv/bin
# No model or dataset hub is needed (the model ships in a pip package, the data in the repo or ../shared).
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# Each tier ends with its wall time, and pytest lists its slowest tests, so a slow newcomer is seen.
PYTEST := $(VENV)/python -m pytest -ra --durations=15 --durations-min=5

.PHONY: setup system demo test test-long lint

## The Python environment only (.venv, torch pinned first): no system package.
setup:
	@bash scripts/setup.sh

## The system packages the long tier's multi-node, Slurm and browser checks use (says what and why first).
system:
	@bash scripts/system_packages.sh

## LoRA on the packaged MiniLM encoder, 2 local processes under DeepSpeed ZeRO-2, packaged SST-2 sample.
demo: setup
	$(VENV)/launcher run recipes/lora_cls.py --nproc 2 strategy=zero2 output_dir=runs/demo overwrite=true

## Lint, then every check that needs no real data, big shape, daemon or compile (within 15 minutes here).
test: lint
	@start=$$(date +%s); $(PYTEST) -m "not long"; code=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s (this tier's budget: 900 s on a 2-core machine)"; exit $$code

## The long checks: real data (missing data fails), 1B/8B shapes, sshd/pdsh/Slurm, compile, the full matrix.
test-long: setup system
	@start=$$(date +%s); LAUNCHER_TEST_TIER=long $(PYTEST) -m long; code=$$?; \
	echo "make test-long: $$(( $$(date +%s) - start )) s"; exit $$code

## ruff: lint rules and formatting (line length 120).
lint: setup
	$(VENV)/ruff check launcher recipes tests benchmarks scripts
	$(VENV)/ruff format --check launcher recipes tests benchmarks scripts

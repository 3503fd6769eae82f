# Two commands a new user needs (see README): `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin
# No model or dataset hub is needed (the model ships in a pip package, the data in the repo or ../shared).
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test test-fast lint

setup:
	@bash scripts/setup.sh

## LoRA on the packaged MiniLM encoder, 2 local processes under DeepSpeed ZeRO-2, packaged SST-2 sample.
demo: setup
	$(VENV)/launcher run recipes/lora_cls.py --nproc 2 strategy=zero2 output_dir=runs/demo overwrite=true

## Lint, then the whole suite, real-data end-to-end runs included (what CI runs).
test: lint
	$(VENV)/python -m pytest -ra --durations=25

## Everything but the slow real-data runs.
test-fast: setup
	$(VENV)/python -m pytest -ra -m "not slow"

## ruff: lint rules and formatting (line length 120).
lint: setup
	$(VENV)/ruff check launcher recipes tests benchmarks scripts
	$(VENV)/ruff format --check launcher recipes tests benchmarks scripts

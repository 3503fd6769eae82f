"""Loading recipe modules and reading a rank's command line.

A recipe is a plain module that defines:
  - `Config`: a `RunConfig` subclass with the task's defaults (and `recipe = "<name>"`);
  - `check(cfg)`: validate the data before any worker starts (raise ConfigError);
  - `build_task(cfg, tokenizer)`: datasets, collate function and anything the model needs;
  - `build_model(cfg, task)`: the base model (the launcher applies the adapter);
  - `eval_outputs(outputs, batch)`: per-example tensors to gather for metrics;
  - `compute_metrics(gathered, task)`: metrics over the whole eval set;
and ends with `if __name__ == "__main__": main()` where `main` calls `launcher.run_recipe`.
See docs/recipes.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType

from launcher.errors import ConfigError

REQUIRED = ("Config", "check", "build_task", "build_model", "eval_outputs", "compute_metrics")


def load_recipe(path: str) -> ModuleType:
    """Import a recipe file by path without running its `main`."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe '{path}' does not exist: give the path of a recipe file, e.g. recipes/lora_cls.py")
    name = "launcher_recipe_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"recipe '{path}' is not a Python module: give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass type hints resolve through sys.modules
    spec.loader.exec_module(module)
    check_contract(module, path)
    return module


def check_contract(module: ModuleType, path: str) -> None:
    missing = [n for n in REQUIRED if not hasattr(module, n)]
    if missing:
        raise ConfigError(f"recipe '{path}' does not define {', '.join(missing)}: see docs/recipes.md")


@dataclass
class WorkerArgs:
    """What a rank's command line says."""

    overrides: list[str]
    plan_path: str | None
    deepspeed_runner: bool
    help: bool


def parse_worker_argv(argv: list[str]) -> WorkerArgs:
    """Split a rank's argv into overrides, the plan file and launcher flags.

    DeepSpeed's runner appends `--local_rank=N`; it is accepted and ignored (LOCAL_RANK is in the
    environment too). Anything else that starts with `--` is a usage error.
    """
    overrides: list[str] = []
    plan_path = None
    deepspeed_runner = False
    show_help = False
    it = iter(argv)
    for arg in it:
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            deepspeed_runner = True
            if "=" not in arg:
                next(it, None)
        elif arg.startswith("--plan"):
            plan_path = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if not plan_path:
                raise ConfigError("--plan needs a file: --plan PATH")
        elif arg in ("-h", "--help"):
            show_help = True
        elif arg.startswith("-"):
            raise ConfigError(f"unknown flag '{arg}': recipes take key=value settings (see --help)")
        else:
            overrides.append(arg)
    return WorkerArgs(overrides, plan_path, deepspeed_runner, show_help)

"""Loading recipe modules and reading a rank's command line.

A recipe is a plain module that defines (docs/recipes.md is the contract):
  - `Config`: a `RunConfig` subclass with the task's defaults (and `recipe = "<name>"`);
  - `check(cfg)`: validate the data before any worker starts (raise ConfigError);
  - `build_task(cfg, tokenizer)`: datasets, collate function and anything the model needs;
  - `build_model(cfg, task)`: the base model (the launcher applies the adapter);
  - `eval_outputs(outputs, batch)`: per-example tensors to gather for metrics;
  - `compute_metrics(gathered, task)`: metrics over the whole eval set;
optionally the hooks in OPTIONAL, and ends with `if __name__ == "__main__": main()` where `main` calls
`launcher.run_recipe`. `Recipe` is the checked view of such a module the rest of the launcher uses.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from launcher.errors import ConfigError

REQUIRED = ("Config", "check", "build_task", "build_model", "eval_outputs", "compute_metrics")
OPTIONAL = {
    "build_tokenizer": "build_tokenizer(cfg) -> the tokenizer, when it is not the model folder's",
    "finish": "finish(engine, task, cfg, ranks): after the final evaluation, on every rank",
}
"""Optional hooks: name -> what it is. A recipe function with a name close to one of these is a misspelling."""


def load_recipe(path: str) -> ModuleType:
    """Import a recipe file by path without running its `main`; its contract is checked."""
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
    """Required names present; no function whose name is a near miss of a hook (it would silently never run)."""
    problems = []
    missing = [n for n in REQUIRED if not hasattr(module, n)]
    if missing:
        problems.append(f"recipe '{path}' does not define {', '.join(missing)}: see docs/recipes.md")
    hooks = [*REQUIRED, *OPTIONAL]
    for name, value in vars(module).items():
        if name.startswith("_") or name in hooks or name == "main" or not inspect.isfunction(value):
            continue
        if value.__module__ != module.__name__:
            continue  # imported, not the recipe's own
        close = difflib.get_close_matches(name, hooks, n=1, cutoff=0.85)  # finish_up (0.8) is no typo of finish
        if close:
            problems.append(
                f"recipe '{path}' defines {name}(), which is not a recipe hook and would never be called: "
                f"did you mean {close[0]}? (hooks: {', '.join(hooks)}; see docs/recipes.md)"
            )
    if problems:
        raise ConfigError(problems)


@dataclass(frozen=True)
class Recipe:
    """A recipe module, checked: its required functions, and its optional hooks or None."""

    module: ModuleType
    path: str
    """Absolute path of the recipe file."""
    Config: type
    check: Callable[[Any], None]
    build_task: Callable[..., Any]
    build_model: Callable[..., Any]
    eval_outputs: Callable[..., dict]
    compute_metrics: Callable[..., dict]
    build_tokenizer: Callable[[Any], Any] | None = None
    finish: Callable[..., None] | None = None

    @classmethod
    def of(cls, module: ModuleType) -> Recipe:
        path = os.path.abspath(getattr(module, "__file__", None) or module.__name__)
        check_contract(module, path)
        return cls(
            module=module,
            path=path,
            **{n: getattr(module, n) for n in REQUIRED},
            **{n: getattr(module, n, None) for n in OPTIONAL},
        )

    @classmethod
    def load(cls, path: str) -> Recipe:
        return cls.of(load_recipe(path))

    @property
    def name(self) -> str:
        return self.Config.recipe


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

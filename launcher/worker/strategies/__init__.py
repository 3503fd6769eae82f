"""Strategies: each is one module with `wrap(EngineInputs) -> Engine`; this table is the only place that maps
a strategy config to its module (imported lazily: DeepSpeed is heavy and only ZeRO needs it)."""

from __future__ import annotations

import importlib
from typing import Any

from launcher.choices import Ddp, Fsdp, Zero
from launcher.config import RunConfig
from launcher.worker.strategies.base import Engine, EngineInputs

__all__ = ["MODULES", "Engine", "EngineInputs", "build_engine", "dry_run_sections"]

MODULES = {Ddp: "ddp", Zero: "zero", Fsdp: "fsdp"}


def build_engine(inputs: EngineInputs) -> Engine:
    module = importlib.import_module(f"{__name__}.{MODULES[type(inputs.cfg.strategy)]}")
    return module.wrap(inputs)


def dry_run_sections(cfg: RunConfig, world_size: int, cuda: bool) -> dict[str, dict[str, Any]]:
    """What the strategy will be configured with, as JSON-ready sections for --dry-run (pure: no heavy import)."""
    if isinstance(cfg.strategy, Zero):
        from launcher.worker.strategies.zero_config import deepspeed_config

        return {"DeepSpeed config": deepspeed_config(cfg, world_size, cuda=cuda)}
    return {}

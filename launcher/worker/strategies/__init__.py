"""Strategies: each is one module with `wrap(EngineInputs) -> Engine`; this table is the only place that maps
a strategy config to its module (imported lazily: DeepSpeed is heavy and only ZeRO needs it)."""

from __future__ import annotations

import importlib

from launcher.config import Ddp, Fsdp, Zero
from launcher.worker.strategies.base import Engine, EngineInputs

MODULES = {Ddp: "ddp", Zero: "zero", Fsdp: "fsdp"}


def build_engine(inputs: EngineInputs) -> Engine:
    module = importlib.import_module(f"{__name__}.{MODULES[type(inputs.cfg.strategy)]}")
    return module.wrap(inputs)

"""The one way a trainable engine is built: the model with its adapter (`adapt`), then wrapped by its strategy with
its optimizer and schedule, and given the step hooks its settings ask for (`wrap`). A rank of a run
(worker/lifecycle), the planner's probe (worker/probe), the test workers and the benchmarks all build through here;
`build_trainable` is both in one call, for a caller with nothing to do between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from launcher.config import RunConfig
from launcher.worker import adalora, adversarial, holdings, memory
from launcher.worker.adapters import apply_adapter, count_parameters
from launcher.worker.compiled import compile_blocks
from launcher.worker.optim import build_optimizer, build_scheduler
from launcher.worker.strategies import Engine, EngineInputs, build_engine
from launcher.worker.weights import Weights, has_meta, weights_for


@dataclass
class Adapted:
    """A model with its adapter applied, not yet wrapped."""

    model: torch.nn.Module
    """The adapted model; parameters still on meta are the strategy's to load from `weights`."""
    block_types: tuple[type, ...]
    """Its transformer block classes (from the model's `_no_split_modules`): FSDP shards, compile compiles, a lean
    rank trims per block."""
    weights: Weights | None
    """Where the meta parameters' values come from (None: the model was built whole)."""
    lean: bool
    """Whether this rank keeps its heap lean (memory.lean for the model's size, unless the caller decided)."""
    trainable: int
    """Trainable parameters, whole."""
    parameters: int
    """All parameters, whole (a packed 4-bit weight counts its unpacked elements)."""


@dataclass
class Built:
    """A trainable engine and what was decided while building it."""

    engine: Engine
    """The wrapped model, its optimizer and schedule, its step hooks attached."""
    adapted: Adapted
    """What the engine wraps (counts, block types, lean)."""
    held: holdings.Recorder
    """What the rank holds of its model state, measured between the last backward and the step."""
    compiled: int = 0
    """Transformer blocks compiled (compile=true)."""
    notes: list[str] = field(default_factory=list)
    """What loading the weights wants the user to know (tensors initialised because the folder lacked them, say)."""


def block_types(model: torch.nn.Module) -> tuple[type, ...]:
    """The classes of `model`'s transformer blocks: those its `_no_split_modules` names."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def adapt(
    base: torch.nn.Module,
    cfg: RunConfig,
    *,
    task_type: str,
    heads: list[str],
    device: torch.device,
    total_steps: int = 0,
    weights: Weights | None = None,
    lean: bool | None = None,
) -> Adapted:
    """`base` (built whole, or on the meta device by `launcher.empty_weights`) with `cfg`'s adapter. A meta-built
    model's values come from `weights`, by default the model folder's (or random:SHAPE's seeded values).
    `total_steps`: the run's optimizer steps (AdaLoRA's schedule; 0: its own minimum). `lean` None decides from
    host_memory and the model's size, before any weight is loaded."""
    if weights is None and has_meta(base):
        weights = weights_for(base, cfg.model_path, seed=cfg.seed)
    if lean is None:
        lean = memory.lean(cfg.host_memory, sum(p.numel() for p in base.parameters()))
    if lean:
        memory.limit_heap_retention()
    blocks = block_types(base)
    model = apply_adapter(
        base, cfg, task_type=task_type, heads=heads, device=device, weights=weights, total_steps=total_steps
    )
    trainable, parameters = count_parameters(model)
    return Adapted(model, blocks, weights, lean, trainable, parameters)


def wrap(
    adapted: Adapted,
    cfg: RunConfig,
    *,
    device: torch.device,
    total_steps: int,
    local_world_size: int = 1,
    holdings_steps: int | None = None,
) -> Built:
    """The engine of `cfg`'s strategy over the adapted model, with `cfg`'s optimizer and a schedule of
    `total_steps`; its hooks: the holdings recorder (measuring the first `holdings_steps` steps, None: every one),
    the adversarial loss (train.adversarial) and AdaLoRA's budget."""
    model, blocks = adapted.model, adapted.block_types

    def make_optimizer(module, plain_groups=None):
        opt = build_optimizer(module, cfg.train, cfg.optimizer, plain_groups)
        return opt, build_scheduler(opt, cfg.train, total_steps)

    compiled = compile_blocks(model, blocks) if cfg.compile else 0
    engine = build_engine(
        EngineInputs(
            model=model,
            cfg=cfg,
            device=device,
            make_optimizer=make_optimizer,
            block_types=blocks,
            local_world_size=local_world_size,
            weights=adapted.weights if has_meta(model) else None,
        )
    )
    if adapted.lean and device.type == "cpu":
        memory.trim_between_blocks(engine.module, blocks)
    held = holdings.Recorder(engine.held_tensors, steps=holdings_steps)
    # The recorder measures before AdaLoRA keeps its gradients (what the step holds, not the budget's copies).
    engine.attach(held, adversarial.attach(engine.module, cfg.train), adalora.attach(engine))
    notes = list(adapted.weights.notes) if adapted.weights is not None else []
    return Built(engine, adapted, held, compiled, notes)


def build_trainable(
    base: torch.nn.Module,
    cfg: RunConfig,
    *,
    task_type: str,
    heads: list[str],
    device: torch.device,
    total_steps: int,
    weights: Weights | None = None,
    lean: bool | None = None,
    local_world_size: int = 1,
    holdings_steps: int | None = None,
) -> Built:
    """`adapt` then `wrap`: the trainable engine of `base` under `cfg`."""
    adapted = adapt(
        base,
        cfg,
        task_type=task_type,
        heads=heads,
        device=device,
        total_steps=total_steps,
        weights=weights,
        lean=lean,
    )
    return wrap(
        adapted,
        cfg,
        device=device,
        total_steps=total_steps,
        local_world_size=local_world_size,
        holdings_steps=holdings_steps,
    )

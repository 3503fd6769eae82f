"""The one interface every strategy returns. The training loop only ever talks to an Engine."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from launcher.config import RunConfig
from launcher.worker.weights import Weights

# Builds (optimizer, scheduler) for the parameters of the module the strategy hands it (sharded or not). A strategy
# whose parameters are not plain tensors passes a second argument that turns param groups into plain ones for the
# optimizers whose kernels need them (optim.PlainGroups).
OptimizerFactory = Callable[..., tuple[torch.optim.Optimizer, Any]]


@dataclass
class EngineInputs:
    """What a strategy needs to wrap a model."""

    model: torch.nn.Module
    """The model with its adapter applied, on CPU, in fp32; parameters still on the meta device (a model built by
    `weights.empty_weights`) are the strategy's to materialize from `weights`, only the part this rank keeps."""
    cfg: RunConfig
    """The resolved run configuration."""
    device: torch.device
    """This rank's device."""
    make_optimizer: OptimizerFactory
    """Called once with the module whose parameters the optimizer should own."""
    block_types: tuple[type, ...]
    """Transformer block classes (FSDP shards each one separately)."""
    local_world_size: int = 1
    """Processes per node, from the plan (FSDP's hybrid shard groups default to one node)."""
    weights: Weights | None = None
    """Where the meta parameters' values come from (None: the model is whole)."""


@dataclass
class StepResult:
    loss: float
    """Mean loss over this rank's micro-batches of the step."""
    grad_norm: float | None
    """Global gradient norm before clipping (None where the strategy does not report it)."""
    lr: float
    """Learning rate used for this step."""
    skipped: bool = False
    """The optimizer step was skipped (fp16 loss scaling found an overflow and lowered the scale)."""


class Engine(ABC):
    """A wrapped model and its optimizer: forward, one optimizer step, and gathered weights."""

    device: torch.device
    module: torch.nn.Module
    """The unwrapped model (adapter applied) whose parameter names the saved files use."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Model outputs for a batch already on `device` (no gradient tracking under `torch.no_grad`)."""

    @abstractmethod
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """Forward and backward on each micro-batch (gradients accumulated), then one optimizer step."""

    @abstractmethod
    def train(self, mode: bool = True) -> None:
        """Switch dropout and the like on (training) or off (evaluation)."""

    @abstractmethod
    def gathered_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU tensors keyed by `module`'s parameter names. Collective: call on every rank."""

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Every tensor a saved model holds (each parameter, a tied one once, and the persistent buffers), whole,
        one at a time: a CPU copy on rank 0, None on the others. Collective: every rank runs it through, in the
        same order. A rank holds one whole tensor at a time, never the whole model."""
        main = torch.distributed.get_rank() == 0 if torch.distributed.is_initialized() else True
        saved = set(self.module.state_dict().keys())  # placeholders or local shards under sharding: cheap
        for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
            if name not in saved:
                continue
            with self.whole(t) as full:
                copy = full.detach().to("cpu", copy=True).contiguous() if main else None
            yield name, copy

    @contextlib.contextmanager
    def whole(self, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
        """`tensor` whole while the context lasts (a sharded strategy gathers it). Collective where it gathers."""
        yield tensor

    def trainable_numel(self) -> int:
        """Elements of the trainable parameters, whole (not this rank's shard): what a saved adapter must hold."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


def clip_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (0 disables clipping) and return the total norm before clipping."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def local_state_dict(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """CPU copies of a module whose tensors are whole on this rank: trainable parameters, or everything."""
    if trainable_only:
        items = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    else:
        items = list(module.state_dict().items())
    return {n: t.detach().to("cpu", copy=True) for n, t in items}


def accumulate_and_step(
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    forward: Callable[[dict[str, torch.Tensor]], Any],
    set_sync: Callable[[bool], None],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
    scaler: Any = None,
    clip: Callable[[list[torch.nn.Parameter], float], float] = clip_norm,
) -> StepResult:
    """The step of the torch-native strategies: backward on each micro-batch with gradient communication only
    on the last (`set_sync`), then clip, optimizer step, schedule step. With fp16 a GradScaler scales the loss,
    unscales before clipping and skips the step (and lowers the scale) when a gradient overflowed. `clip` clips
    and returns the global norm (a strategy with sharded gradients brings its own)."""
    losses = []
    for i, batch in enumerate(micro_batches):
        set_sync(i == len(micro_batches) - 1)
        loss = forward(batch).loss
        scaled = loss / len(micro_batches)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        losses.append(loss.item())
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = clip(params, max_grad_norm)
    lr = current_lr(optimizer)
    skipped = False
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler lowers its scale exactly when it skips a step
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=sum(losses) / len(losses), grad_norm=norm, lr=lr, skipped=skipped)


def frozen_dtype(precision: str) -> Callable[[torch.nn.Parameter], torch.dtype]:
    """The dtype a strategy that casts parameters for compute (FSDP2's param_dtype) stores a materialized one in:
    a frozen parameter in the compute dtype (it is never updated, and this halves a bf16 run's frozen base), a
    trained one in fp32 (its optimizer updates it)."""
    low = compute_dtype(precision) or torch.float32
    return lambda p: torch.float32 if p.requires_grad else low


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast / mixed-precision dtype, or None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

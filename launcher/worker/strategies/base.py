"""The one interface every strategy returns. The training loop only ever talks to an Engine."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from launcher.checkpoints import unmatched_parameters
from launcher.config import RunConfig
from launcher.worker import eight_bit, holdings
from launcher.worker.hooks import Hooks, MicroLoss, StepHook, plain_loss
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
    """One optimizer step's figures. The loss and the norm stay on the device, as 0-d tensors: reading them syncs the
    host with the device, which the loop does once per logged interval, not once per step (float(x) reads one)."""

    loss: torch.Tensor
    """Mean loss over this rank's micro-batches of the step (0-d, on the device, detached)."""
    grad_norm: torch.Tensor | None
    """Global gradient norm before clipping (0-d, on the device; None where the strategy does not report it)."""
    lr: float
    """Learning rate used for this step."""
    skipped: bool = False
    """The optimizer step was skipped (fp16 loss scaling found an overflow and lowered the scale)."""


class Engine(ABC):
    """A wrapped model and its optimizer: forward, one optimizer step, and gathered weights."""

    device: torch.device
    module: torch.nn.Module
    """The unwrapped model (adapter applied) whose parameter names the saved files use."""

    @property
    def hooks(self) -> Hooks:
        """The step hooks attached (worker.hooks): train_step gets each micro-batch's loss from them and calls their
        `before_step` after the last backward, before the optimizer step."""
        if "_hooks" not in vars(self):
            self._hooks = Hooks()
        return self._hooks

    def attach(self, *hooks: StepHook | None) -> None:
        """Make `hooks` take part in every step from now on, in this order (a None is skipped)."""
        for hook in hooks:
            if hook is not None:
                self.hooks.add(hook)

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
        for name, t in saved_tensors(self.module):
            with self.whole(t) as full:
                copy = full.detach().to("cpu", copy=True).contiguous() if main else None
            yield name, copy

    @contextlib.contextmanager
    def whole(self, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
        """`tensor` whole while the context lasts (a sharded strategy gathers it). Collective where it gathers."""
        yield tensor

    def stepping_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that updates the trained values (inside a wrapper such as DeepSpeed's ZeRO optimizer)."""
        return self.optimizer

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """What this rank holds of the model state, by sizing.TERMS (counted by `holdings.measure`, each storage
        once): here the module's tensors as they are, their gradients and the optimizer's states. A strategy that
        keeps shards, flat buffers or master copies names them."""
        m = self.module
        return {
            "params": [*m.parameters(), *m.buffers(), *holdings.quantization_constants(m)],
            "grads": [p.grad for p in m.parameters() if p.grad is not None],
            "optimizer": list(holdings.optimizer_states(self.stepping_optimizer())),
        }

    def trainable_numel(self) -> int:
        """Elements of the trainable parameters, whole (not this rank's shard): what a saved adapter must hold."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    # ---- checkpoints: the trained state, whole, so that it does not depend on the number of processes.
    # Strategies override the four hooks below (trained_value, set_trained, optimizer_state, set_optimizer_state).

    optimizer: torch.optim.Optimizer
    scheduler: Any

    def train_state(self) -> tuple[dict, Iterator[tuple[str, torch.Tensor | None]]]:
        """(scalars, tensors): each trained parameter ("param/NAME") and each of its optimizer state tensors
        ("optim/NAME/KEY"), whole, one at a time (CPU copies on rank 0, None elsewhere); and the rest (optimizer
        hyperparameters and per-parameter scalars such as Adam's step, the schedule, the loss scaler), complete once
        the tensors have been iterated. Collective: every rank iterates the tensors through."""
        main = torch.distributed.get_rank() == 0
        scaler = getattr(self, "scaler", None)
        scalars: dict[str, Any] = {
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "optimizer": {},
        }

        def tensors() -> Iterator[tuple[str, torch.Tensor | None]]:
            for name, p in self.trained_parameters():
                value = self.trained_value(p)
                yield f"param/{name}", value if main else None
                for key, v in sorted(self.optimizer_state(p).items()):
                    if torch.is_tensor(v) and v.dim() > 0:
                        yield f"optim/{name}/{key}", v.detach().to("cpu", copy=True).contiguous() if main else None
                    else:
                        scalars["optimizer"].setdefault(name, {})[key] = (
                            v.detach().cpu().clone() if torch.is_tensor(v) else v
                        )

        return scalars, tensors()

    def load_train_state(self, scalars: dict, keys: set[str], tensor: Callable[[str], torch.Tensor]) -> None:
        """Put back what `train_state` gave: `keys` are the stored tensors' names, `tensor(key)` reads one whole.
        Collective where the strategy's setters are."""
        unmatched = unmatched_parameters([n for n, _ in self.trained_parameters()], keys)
        if unmatched:
            raise ValueError(f"the checkpoint's trained parameters differ from this model's: {unmatched}")
        for name, p in self.trained_parameters():
            self.set_trained(p, tensor(f"param/{name}"))
            prefix = f"optim/{name}/"
            state = {k[len(prefix) :]: tensor(k) for k in sorted(keys) if k.startswith(prefix)}
            state.update(scalars["optimizer"].get(name, {}))
            self.set_optimizer_state(p, state)
        for group, saved in zip(self.optimizer.param_groups, scalars["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr")})
        self.scheduler.load_state_dict(scalars["scheduler"])
        scaler = getattr(self, "scaler", None)
        if scaler is not None and scalars["scaler"] is not None:
            scaler.load_state_dict(scalars["scaler"])

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def trained_value(self, p: torch.nn.Parameter) -> torch.Tensor:
        """A trained parameter's value, whole, as a CPU copy (fp32 master weights where the strategy keeps them).
        Collective where the strategy gathers."""
        with self.whole(p) as full:
            return full.detach().to("cpu", copy=True).contiguous()

    def trained_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """A trained parameter's gradient, whole and reduced over the ranks, between the last backward and the
        optimizer step (a strategy that partitions gradients gathers it: collective there)."""
        return p.grad

    def set_trained(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set a trained parameter from its whole value."""
        with torch.no_grad():
            p.copy_(value.to(p.dtype))

    def optimizer_state(self, p: torch.nn.Parameter) -> dict[str, Any]:
        """The optimizer's state of a trained parameter, each tensor whole (an 8-bit optimizer's moments
        dequantized: see eight_bit). Collective where the strategy gathers."""
        return eight_bit.dequantized(self.optimizer.state.get(p, {}))

    def set_optimizer_state(self, p: torch.nn.Parameter, state: dict[str, Any]) -> None:
        """Give the optimizer a trained parameter's state (tensors whole); scalars such as Adam's step stay on the
        CPU, as the optimizer made them."""
        state = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()}
        if eight_bit.is_eight_bit(self.optimizer):
            eight_bit.restore(self.optimizer, p, state)
        else:
            self.optimizer.state[p] = state


def clip_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0 disables clipping) and return the total norm before clipping, on the device (clipping
    scales by min(1, max_norm / norm) on the device: no host sync)."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")).detach()


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
    clip: Callable[[list[torch.nn.Parameter], float], torch.Tensor] = clip_norm,
    before_step: Callable[[], None] | None = None,
    micro_loss: MicroLoss = plain_loss,
) -> StepResult:
    """The step of the torch-native strategies: backward on each micro-batch with gradient communication only
    on the last (`set_sync`), then clip, optimizer step, schedule step. With fp16 a GradScaler scales the loss,
    unscales before clipping and skips the step (and lowers the scale) when a gradient overflowed. `clip` clips
    and returns the global norm (a strategy with sharded gradients brings its own). `before_step` is called after
    the last backward. `micro_loss` gives each micro-batch's loss. The step's loss is summed on the device (no host
    sync: see StepResult)."""
    total = None
    for i, batch in enumerate(micro_batches):
        loss, shown = micro_loss(forward, batch, set_sync, i == len(micro_batches) - 1)
        scaled = loss / len(micro_batches)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        shown = shown.detach() / len(micro_batches)
        total = shown if total is None else total + shown
    if before_step is not None:
        before_step()
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = clip(params, max_grad_norm)
    lr = current_lr(optimizer)
    skipped = False
    if scaler is not None:
        scale = scaler.get_scale()  # fp16 only: the scaler reads its found-inf flags on the host anyway
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler lowers its scale exactly when it skips a step
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=total, grad_norm=norm, lr=lr, skipped=skipped)


def frozen_dtype(precision: str) -> Callable[[torch.nn.Parameter], torch.dtype]:
    """The dtype a strategy that casts parameters for compute (FSDP2's param_dtype) stores a materialized one in:
    a frozen parameter in the compute dtype (it is never updated, and this halves a bf16 run's frozen base), a
    trained one in fp32 (its optimizer updates it)."""
    low = compute_dtype(precision) or torch.float32
    return lambda p: torch.float32 if p.requires_grad else low


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast / mixed-precision dtype, or None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def saved_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a saved model holds, as `save_pretrained` would write it: each parameter (a tied one once, under its
    first name) and each persistent buffer."""
    saved = set(module.state_dict().keys())  # placeholders or local shards under sharding: cheap
    return [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if n in saved]

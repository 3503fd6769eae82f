"""What takes part in a training step besides the strategy, through one declared protocol.

A hook is attached to an Engine (`Engine.attach`) once the engine is built: the holdings recorder measures what the
rank holds between the last backward and the step, AdaLoRA's budget keeps the gradients there and prunes after the
step (and is kept in checkpoints), the adversarial loss replaces how a micro-batch's loss is computed. Whoever
drives steps (the training loop, a checkpoint, summary.json) asks the engine's `Hooks`, never a hook by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

# A micro-batch's loss: (forward, batch, set_sync, sync, probe=None) -> (the loss to backpropagate, the loss to
# report). It sets the strategy's gradient sync (set_sync) to `sync` before the forward whose backward reduces
# gradients; `probe` is a forward whose loss may also be differentiated alone (torch.autograd.grad), where the
# strategy's own forward cannot be (DeepSpeed's engine treats any backward through its outputs as the step's).
MicroLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def plain_loss(forward, batch, set_sync, sync: bool, probe=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own loss of the micro-batch (worker.adversarial's Adversary adds a perturbed one)."""
    set_sync(sync)
    loss = forward(batch).loss
    return loss, loss


class StepHook:
    """One participant in every training step. Each method is optional: the defaults do nothing."""

    key: ClassVar[str | None] = None
    """Its name in a checkpoint's state (None: a checkpoint keeps nothing of it)."""
    micro_loss: MicroLoss | None = None
    """How a micro-batch's loss is computed, where the hook replaces the model's own (at most one hook does)."""

    def before_step(self) -> None:
        """After the last backward of a step, before the optimizer step: the gradients are reduced and still held,
        the optimizer states exist from the second step on. Collective where the hook gathers: every rank calls it."""

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""

    def state(self) -> Any:
        """What a checkpoint keeps of the hook, alike on every rank (only for a hook with a `key`)."""
        return None

    def restore(self, state: Any) -> None:
        """Take back what `state` gave (None where the checkpoint holds nothing under `key`)."""

    def summary(self) -> dict:
        """Its entries in summary.json. Collective where it gathers: every rank calls it."""
        return {}


class Hooks:
    """An engine's hooks, in the order attached; every call goes to each of them in that order."""

    def __init__(self) -> None:
        self.hooks: list[StepHook] = []

    def add(self, hook: StepHook) -> None:
        if hook.micro_loss is not None and self.micro_loss is not plain_loss:
            raise ValueError(f"{type(hook).__name__}: the micro-batch loss is replaced by another hook already")
        self.hooks.append(hook)

    @property
    def micro_loss(self) -> MicroLoss:
        return next((h.micro_loss for h in self.hooks if h.micro_loss is not None), plain_loss)

    def before_step(self) -> None:
        for h in self.hooks:
            h.before_step()

    def after_step(self, step: int) -> None:
        for h in self.hooks:
            h.after_step(step)

    def state(self) -> dict:
        return {h.key: h.state() for h in self.hooks if h.key is not None}

    def restore(self, state: dict) -> None:
        for h in self.hooks:
            if h.key is not None:
                h.restore(state.get(h.key))

    def summary(self) -> dict:
        out: dict = {}
        for h in self.hooks:
            out |= h.summary()
        return out

"""A causal LM whose training loss comes from fused_ce.linear_cross_entropy: the whole logits are never made.

Transformers' causal LMs compute `logits = self.lm_head(hidden)` over every position, then `self.loss_function(logits,
labels)`. `fuse_loss(model)` makes the output layer itself compute the loss when the model was called with labels and
gradients are on (a training forward): the layer gets the labels from a hook on the model, returns no logits (a
zero-width tensor) and hands the loss to the model's loss function. Everything else, evaluation and generation
included, gets the real logits. The loss is computed inside the output layer's own forward, so a strategy that gathers
a module's parameters around its forward (ZeRO-3, FSDP) has the weight whole there.
"""

from __future__ import annotations

import torch

from launcher.kernels.fused_ce import IGNORE_INDEX, linear_cross_entropy


class _Forward:
    """The labels of the training forward under way, and the loss the head made of them. Shared, never copied: a
    copy of the head (peft's modules_to_save) still reads the model's labels."""

    def __init__(self):
        self.labels: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        return self


class FusedLMHead(torch.nn.Linear):
    """The model's own output layer (same parameters, names and shapes), its class swapped by fuse_loss."""

    forward_state: _Forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        state = self.forward_state
        labels, state.labels = state.labels, None
        if labels is None or self.bias is not None:
            return super().forward(hidden)
        # Tokens < n predict n: the label of position i is labels[i + 1] (the last position has none).
        shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        state.loss = linear_cross_entropy(hidden, self.weight, shifted)
        return hidden.new_zeros(*hidden.shape[:-1], 0)


def fuse_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model` (a transformers causal LM with an `lm_head` Linear) compute its training loss with the fused
    kernel; returns it. Raises ValueError for a model without such a head."""
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"{type(model).__name__} has no lm_head Linear layer for the fused loss")
    state = _Forward()
    head.__class__ = FusedLMHead
    head.forward_state = state
    plain = model.loss_function

    def take_labels(_module, args, kwargs):
        state.labels = kwargs.get("labels") if torch.is_grad_enabled() else None

    def loss_function(logits, labels, vocab_size, **kwargs):
        if state.loss is not None and logits.shape[-1] == 0:
            loss, state.loss = state.loss, None
            return loss
        return plain(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)

    model.register_forward_pre_hook(take_labels, with_kwargs=True)
    model.loss_function = loss_function
    return model

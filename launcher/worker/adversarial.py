"""Adversarial training on the word embeddings (train.adversarial): FGM (Miyato et al., 2017) and PGD (Madry et al.,
2018), as Chinese-BERT practice uses them.

FGM moves the word-embedding matrix by r = epsilon * g / ||g||, g the gradient of the micro-batch's loss with respect
to that matrix, and adds the gradients of the loss at W + r to the clean ones. PGD takes `steps` moves of alpha * g /
||g||, each from the gradient at the point reached, projected back into the ball ||r|| <= epsilon, and adds the
gradients at the last one. Only the rows of the micro-batch's tokens have a gradient, so moving the matrix is
adding r[token] to the embedding layer's output: that is what is done here, in a forward hook, and the matrix itself
is never written (nothing to restore, and a sharded or frozen embedding is perturbed the same way).

g comes from the micro-batch's own clean loss (torch.autograd.grad to the embedding output: no parameter gradient,
no strategy hook), so gradient accumulation perturbs each micro-batch as it would alone. The step's backward is one
backward of clean + adversarial loss, so each strategy reduces gradients once, as it always does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from launcher.worker.hooks import StepHook

Forward = Callable[[dict[str, torch.Tensor]], Any]


def unit(g: torch.Tensor) -> torch.Tensor:
    """g / ||g|| (Frobenius), or zeros when g is zero or not finite (no direction to move in)."""
    norm = torch.linalg.vector_norm(g)
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, g / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(g))


def project(r: torch.Tensor, epsilon: float) -> torch.Tensor:
    """r scaled back onto the ball ||r|| <= epsilon when it left it."""
    norm = torch.linalg.vector_norm(r)
    return r * torch.clamp(epsilon / torch.clamp(norm, min=1e-12), max=1.0)


class Adversary(StepHook):
    """Hooks the word embeddings of a model; its `micro_loss` is a micro-batch's clean + adversarial loss."""

    def __init__(self, embedding: torch.nn.Module, kind: str, epsilon: float, alpha: float = 0.3, steps: int = 1):
        assert kind in ("fgm", "pgd"), kind
        self.kind, self.epsilon, self.alpha = kind, epsilon, alpha
        self.steps = steps if kind == "pgd" else 1
        self.rows: torch.Tensor | None = None
        """The perturbation of each distinct token of the micro-batch (None: the hook adds nothing)."""
        self.capture = False
        """Whether the hook makes what it adds a leaf whose gradient is read (`added`)."""
        self.ids: torch.Tensor | None = None
        self.added: torch.Tensor | None = None
        self.last_rows: torch.Tensor | None = None
        """The perturbation of the last adversarial forward (tests read it)."""
        self.handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.rows is None and not self.capture:
            return None  # evaluation, generation, a model without adversarial training in this step
        self.ids = args[0]
        if self.rows is None:
            add = torch.zeros_like(out)
        else:
            add = self.rows[self._inverse].reshape(out.shape).to(out.dtype)
        if self.capture:
            add = add.detach().requires_grad_(True)
            self.added = add
        return out + add

    def _row_grad(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient of the embedding matrix's rows of the micro-batch's tokens, summed over their occurrences."""
        flat = g.reshape(-1, g.shape[-1]).float()
        return torch.zeros(self._distinct, flat.shape[1], device=flat.device).index_add_(0, self._inverse, flat)

    def _gradient(self, loss: torch.Tensor, retain: bool) -> torch.Tensor:
        (g,) = torch.autograd.grad(loss, self.added, retain_graph=retain)
        return self._row_grad(g)

    def micro_loss(
        self,
        forward: Forward,
        batch: dict[str, torch.Tensor],
        set_sync: Callable[[bool], None],
        sync: bool,
        probe: Forward | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean + adversarial loss to backpropagate, the clean loss to report) of one micro-batch. The clean and
        pgd's intermediate forwards are differentiated to the embeddings alone: they run through `probe` (default
        `forward`) without gradient sync (`set_sync`), which is set to `sync` for the adversarial forward."""
        probe = probe or forward
        set_sync(False)
        self.rows, self.capture = None, True
        clean = probe(batch).loss
        _, self._inverse = torch.unique(self.ids.reshape(-1), return_inverse=True)
        self._distinct = int(self._inverse.max()) + 1
        g = self._gradient(clean, retain=True)
        if self.kind == "fgm":
            rows = self.epsilon * unit(g)
        else:
            rows = project(self.alpha * unit(g), self.epsilon)
            for _ in range(self.steps - 1):
                self.rows = rows
                g = self._gradient(probe(batch).loss, retain=False)
                rows = project(rows + self.alpha * unit(g), self.epsilon)
        set_sync(sync)
        self.rows, self.capture = rows, False
        try:
            adversarial = forward(batch).loss
        finally:
            self.last_rows, self.rows, self.added = rows, None, None
        return clean + adversarial, clean


def attach(model: torch.nn.Module, train) -> Adversary | None:
    """An Adversary on `model`'s word embeddings for train.adversarial (None when it is none)."""
    if train.adversarial == "none":
        return None
    return Adversary(
        model.get_input_embeddings(), train.adversarial, train.adv_epsilon, alpha=train.adv_alpha, steps=train.adv_steps
    )

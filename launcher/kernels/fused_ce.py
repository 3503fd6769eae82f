"""Linear + cross-entropy that never holds the whole [tokens x vocabulary] logits.

A causal LM's loss multiplies every token's hidden state by the output layer and takes the cross-entropy over the
vocabulary: at 8,192 tokens x 128,256 entries the fp32 logits alone are 4.2 GB, and autograd keeps them (and their
softmax) for backward. Here the tokens go through in chunks: each chunk's logits are made, turned into its loss and,
in the same pass, into its gradients (softmax - one-hot, times the output scale), and dropped. The gradients of the
hidden states (and of the weight, when it is trained) are kept for backward, which only scales them by the incoming
gradient: the three matrix products of eager forward + backward, and one chunk of logits at a time.

`linear_cross_entropy` is a `torch.library.custom_op` with its autograd registered, so `torch.compile` treats it as one
opaque op; `reference` is the eager computation it must equal.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 128 * 2**20
"""The fp32 logits of one chunk of tokens (the default chunk: 261 tokens of a 128,256 vocabulary): large enough
that the matrix products run at full speed, small beside the model."""


def reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over the labelled tokens (eager, fp32 softmax)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return torch.nn.functional.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=ignore_index)


@torch.library.custom_op("launcher::linear_ce", mutates_args=())
def _linear_ce(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk: int, grads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, d loss/d hidden, d loss/d weight); `grads` 0: none (empty tensors), 1: hidden's, 2: both."""
    n = hidden.shape[0]
    valid = labels != ignore_index
    count = valid.sum().clamp(min=1).to(torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads >= 1 else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads >= 2 else weight.new_empty(0)
    for start in range(0, n, chunk):
        h = hidden[start : start + chunk]
        y = labels[start : start + chunk]
        keep = y != ignore_index
        logits = (h @ weight.t()).float()  # the one chunk-sized buffer: everything below works in place
        target = torch.where(keep, y, 0)
        picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(top).exp_()
        norm = probs.sum(dim=1, keepdim=True)
        lse = top.squeeze(1) + norm.squeeze(1).log()
        total = total + torch.where(keep, lse - picked, 0.0).sum()
        if grads == 0:
            continue
        # d loss / d logits = (softmax - one-hot) / count on labelled rows, 0 elsewhere.
        probs.div_(norm)
        probs.scatter_add_(1, target.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
        probs.mul_((keep.to(probs.dtype) / count).unsqueeze(1))
        g = probs.to(hidden.dtype)
        grad_hidden[start : start + chunk] = g @ weight
        if grads >= 2:
            grad_weight.addmm_(g.t().float(), h.float())
    return total / count, grad_hidden, grad_weight.to(weight.dtype) if grads >= 2 else grad_weight


@_linear_ce.register_fake
def _(hidden, weight, labels, ignore_index, chunk, grads):
    empty = hidden.new_empty(0)
    return (
        hidden.new_empty((), dtype=torch.float32),
        torch.empty_like(hidden) if grads >= 1 else empty,
        torch.empty_like(weight) if grads >= 2 else weight.new_empty(0),
    )


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.grads = inputs[5]


def _backward(ctx, grad_loss, _grad_hidden, _grad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    dh = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.grads >= 1 else None
    dw = grad_weight * grad_loss.to(grad_weight.dtype) if ctx.grads >= 2 else None
    return dh, dw, None, None, None, None


_linear_ce.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk: int = 0,
) -> torch.Tensor:
    """`reference(hidden, weight, labels)` holding `chunk` tokens' logits at a time (0: as many as make CHUNK_BYTES
    of fp32 logits). hidden [..., H], weight [V, H], labels [...] (already aligned with hidden: shift them first for
    next-token prediction). A batch with no labelled token has loss 0 (eager's mean over no token is nan)."""
    if chunk < 0:
        raise ValueError(f"chunk={chunk}: must be 0 (automatic) or more")
    chunk = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    flat = hidden.reshape(-1, hidden.shape[-1])
    target = labels.reshape(-1).to(flat.device)
    # Which gradients the pass makes (0 none, 1 the hidden states', 2 the weight's too; a trained weight under a
    # frozen input still gets the hidden states' gradient made, which costs one product, not memory kept whole).
    grads = 0
    if torch.is_grad_enabled():
        grads = 2 if weight.requires_grad else int(flat.requires_grad)
    return _linear_ce(flat.contiguous(), weight, target, ignore_index, chunk, grads)[0]

"""ZeRO-3's 4-bit layers: bitsandbytes' 4-bit matmul with the weight saved for backward as the layer's parameter
itself, so DeepSpeed's release of a gathered parameter frees its storage (Matmul4bit says why and what it saved)."""

from __future__ import annotations

import torch


class Matmul4bit(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul, but backward finds the weight through the layer's own parameter (saved as is)
    instead of a view of its data taken in forward. ZeRO-3 releases a gathered parameter by giving it new, empty data;
    a view taken in forward would keep the gathered storage alive until backward, so every 4-bit layer of the model
    stayed gathered on every rank through the whole forward (the 1B model's QLoRA step: +1 GB per rank). The saved
    parameter is the one DeepSpeed gathers again before the layer's backward (or, under activation checkpointing,
    the recomputed forward's), as for a plain linear layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, quant_state):
        import bitsandbytes as bnb

        ctx.save_for_backward(weight)
        ctx.quant_state = quant_state
        # Gradients are off inside forward: bitsandbytes runs its kernel without building its own autograd node.
        return bnb.matmul_4bit(x, weight, bias=bias, quant_state=quant_state)

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as F

        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad, F.dequantize_4bit(weight.view(-1, 1), ctx.quant_state).to(grad.dtype))
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


def forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward (training path) over Matmul4bit."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(self)
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = self.bias
    if bias is not None and self.compute_dtype is not None:
        bias = bias.to(self.compute_dtype)
    return Matmul4bit.apply(x, self.weight, bias, self.weight.quant_state).to(dtype)


def release_4bit_weights_after_use(module: torch.nn.Module) -> None:
    """Every bitsandbytes 4-bit layer of `module` runs forward_4bit (see Matmul4bit)."""
    import types

    import bitsandbytes as bnb

    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.forward = types.MethodType(forward_4bit, m)

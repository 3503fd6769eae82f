"""bitsandbytes' 8-bit optimizer states in a checkpoint, independent of how the run was sharded.

An 8-bit Adam keeps each moment as uint8 codes in blocks of 256 values, each block with its own scale (absmax), over
whatever tensor the optimizer was handed: a whole parameter under DDP, a rank's rows under FSDP2, a rank's flat
partition of many parameters under ZeRO. Codes and blocks of one layout mean nothing in another, so a checkpoint
holds, per element, each moment's value (fp32, dequantized) and the scale of the block it was quantized in
(`scale1`, `scale2`): whole tensors of the parameter's shape, like AdamW's moments. A resumed run quantizes them
back into its own layout: a block whose elements share one stored scale (every block, on the same layout) takes
that scale back, and each value its very code, so the resume is exact; the blocks of another layout (another
number of processes) are quantized afresh, as the optimizer itself does every step. (The scale cannot be found
again from the values: the largest value of a block need not sit on the code book's end, e.g. the signed map
ends at -0.993 and +1.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

BLOCKSIZE = 256
"""bitsandbytes' block size for 8-bit optimizer states (`Optimizer2State.init_state`)."""
MOMENTS = (("state1", "qmap1", "absmax1", "scale1"), ("state2", "qmap2", "absmax2", "scale2"))
"""Each moment's codes, code book and block scales, as bitsandbytes names them in a parameter's state, and the name
of its per-element scale in a checkpoint."""
LAYOUT_KEYS = {"qmap1", "qmap2", "absmax1", "absmax2"}
"""What a quantized state has beyond its moments and step: the layout, not stored as such."""


def is_eight_bit(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is one of bitsandbytes' (8-bit or paged 8-bit AdamW)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizers wrap ours
    return any(c.__module__.startswith("bitsandbytes.") for c in type(inner).__mro__)


def dequantized(state: dict) -> dict:
    """A parameter's state with each of bitsandbytes' moments as fp32 values of its tensor's shape, and each value's
    block scale (NaN for a moment bitsandbytes kept in fp32, below min_8bit_size: so that every state has the same
    keys, whatever part of a parameter a rank holds); other states unchanged."""
    if not _bitsandbytes(state):
        return dict(state)
    out = {k: v for k, v in state.items() if k not in LAYOUT_KEYS}
    for moment, qmap, absmax, scale in MOMENTS:
        codes = state[moment]
        if codes.dtype != torch.uint8:
            out[scale] = torch.full_like(codes, float("nan"), dtype=torch.float32)
            continue
        per_element = state[absmax].repeat_interleave(BLOCKSIZE)[: codes.numel()].reshape(codes.shape)
        out[moment] = state[qmap][codes.long()] * per_element  # what bitsandbytes' dequantization computes
        out[scale] = per_element.clone()
    return out


def restore(optimizer: torch.optim.Optimizer, param: torch.Tensor, values: dict) -> None:
    """Make `param`'s state in a bitsandbytes `optimizer` (its inner one under ZeRO) from `values` as `dequantized`
    gives them (of `param`'s shape; the scales may be missing: then every block is quantized afresh): the optimizer
    lays the state out as in its first step, and each moment is quantized into it."""
    _init_state(optimizer, param)
    state = optimizer.state[param]
    named = {k for m in MOMENTS for k in (m[0], m[3])}
    state.update({k: v for k, v in values.items() if k not in named})
    for moment, qmap, absmax, scale in MOMENTS:
        value = values[moment].to(param.device, torch.float32).reshape(-1)
        if state[moment].dtype != torch.uint8:  # smaller than min_8bit_size: bitsandbytes keeps it in fp32
            state[moment].copy_(value.reshape(state[moment].shape))
            continue
        stored = values.get(scale)
        scales = _block_scales(value, None if stored is None else stored.to(value.device, torch.float32).reshape(-1))
        state[absmax].copy_(scales)
        state[moment].copy_(_codes(value, scales, state[qmap]).reshape(state[moment].shape))
    step = state.get("step")
    if torch.is_tensor(step):  # bitsandbytes counts in a Python int
        state["step"] = int(step.item())


def _block_scales(value: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
    """Each block's scale: the one its elements were quantized with where they all share it, else its largest
    magnitude (a NaN scale, of values kept in fp32, is shared by none)."""
    blocks = -(-value.numel() // BLOCKSIZE)
    pad = blocks * BLOCKSIZE - value.numel()

    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, pad)).reshape(blocks, BLOCKSIZE)

    fresh = rows(value.abs()).amax(dim=1)
    if stored is None:
        return fresh
    grid = rows(stored)
    if pad:  # the padding of the last block takes its first element's scale, so that it does not break the tie
        grid[-1, BLOCKSIZE - pad :] = grid[-1, 0]
    shared = (grid == grid[:, :1]).all(dim=1)
    return torch.where(shared, grid[:, 0], fresh)


def _codes(value: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """The nearest code of each value over its block's scale (a zero block: the code of 0)."""
    per_element = scales.repeat_interleave(BLOCKSIZE)[: value.numel()]
    normalized = torch.where(per_element > 0, value / per_element.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    book, order = torch.sort(qmap)
    hi = torch.searchsorted(book, normalized.contiguous()).clamp(1, len(book) - 1)
    lo = hi - 1
    nearest = torch.where((normalized - book[lo]).abs() <= (book[hi] - normalized).abs(), lo, hi)
    return order[nearest].to(torch.uint8)


@contextlib.contextmanager
def dequantized_states(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Every 8-bit state of `optimizer` dequantized in place while the context lasts (what a strategy whose
    optimizer steps flat partitions reads per parameter, for a checkpoint), then the quantized ones put back."""
    saved = {p: s for p, s in optimizer.state.items() if _bitsandbytes(s)}
    for p, s in saved.items():
        optimizer.state[p] = dequantized(s)
    try:
        yield
    finally:
        for p, s in saved.items():
            optimizer.state[p] = s


def requantize_states(optimizer: torch.optim.Optimizer) -> None:
    """Quantize back each state left dequantized (values and scales put in by a strategy that loads per
    parameter)."""
    for p, s in list(optimizer.state.items()):
        if s and not _quantized(s) and all(m[0] in s for m in MOMENTS):
            restore(optimizer, p, dict(s))


def _bitsandbytes(state: dict) -> bool:
    """Whether `state` is one of bitsandbytes' (its moments are named state1 and state2, in 8 bits or 32)."""
    return all(torch.is_tensor(state.get(m[0])) for m in MOMENTS)


def _quantized(state: dict) -> bool:
    first = state.get("state1")
    return torch.is_tensor(first) and first.dtype == torch.uint8


def _init_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    """A fresh state for `param`, laid out as the optimizer does before its first step (bitsandbytes reads the
    parameter's configuration through its group and indices). A parameter the groups do not hold now (ZeRO-3 hands
    its inner optimizer one flat partition at a time, through the first group) is put there for the call: what the
    layout depends on (bits, min_8bit_size) is the same in every group."""
    optimizer.state[param] = {}
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p is param:
                optimizer.init_state(group, param, gindex, pindex)
                return
    group = optimizer.param_groups[0]
    held = group["params"]
    group["params"] = [param]
    try:
        optimizer.init_state(group, param, 0, 0)
    finally:
        group["params"] = held

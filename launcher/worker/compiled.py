"""`compile=true`: each transformer block compiled by torch.compile, in place.

Per block, as torchtitan compiles: the blocks of a model share one graph (compiled once, then reused), and what a
strategy does between blocks (FSDP2's all-gathers, DDP's bucketed all-reduces, the heap trims of a lean CPU rank)
stays outside the graphs. `nn.Module.compile` keeps each block the same module with the same parameter names, so
saved adapters, models and checkpoints are what an eager run writes.
"""

from __future__ import annotations

import torch

from launcher.errors import ConfigError


def compile_blocks(model: torch.nn.Module, block_types: tuple[type, ...]) -> int:
    """Compile every block of `model` whose class is one of `block_types`; returns how many were compiled."""
    blocks = [m for m in model.modules() if isinstance(m, block_types)] if block_types else []
    if not blocks:
        raise ConfigError(
            f"compile=true: {type(model).__name__} names no transformer block classes (_no_split_modules), so "
            "there is nothing to compile block by block; set compile=false"
        )
    for block in blocks:
        # Sequence lengths vary from batch to batch: a second length recompiles once with dynamic shapes.
        block.compile()
    return len(blocks)

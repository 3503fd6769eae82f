"""The one compatibility table: which strategy x adapter x optimizer (x precision) combinations work, and why not.

Each `Rule` refuses a family of combinations with the reason and the fix. The same rules drive validation before
launch (`refusals`), the `launcher matrix` grid and the generated docs/matrix.md, and the multi-process matrix
test runs every combination they allow. Pure: no torch import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from launcher.choices import ADAPTERS, OPTIMIZERS, Fsdp, QLora, Zero
from launcher.config import RunConfig

# Representative strategies: the rows of the table (every refinement that changes what is compatible).
ROWS: dict[str, tuple[str, ...]] = {
    "ddp": ("strategy=ddp",),
    "zero0": ("strategy=zero0",),
    "zero1": ("strategy=zero1",),
    "zero2": ("strategy=zero2",),
    "zero3": ("strategy=zero3",),
    "zero1 offload opt": ("strategy=zero1", "strategy.offload_optimizer=cpu"),
    "zero2 offload opt": ("strategy=zero2", "strategy.offload_optimizer=cpu"),
    "zero3 offload opt": ("strategy=zero3", "strategy.offload_optimizer=cpu"),
    "zero3 offload opt+params": (
        "strategy=zero3",
        "strategy.offload_optimizer=cpu",
        "strategy.offload_params=cpu",
    ),
    "fsdp": ("strategy=fsdp",),
    # Groups of one rank: on a 2-process test machine this really replicates across groups (HSDP's all-reduce).
    "fsdp hybrid": ("strategy=fsdp", "strategy.shard=hybrid", "strategy.shard_group_size=1"),
    "fsdp offload params": ("strategy=fsdp", "strategy.offload_params=cpu"),
}


@dataclass(frozen=True)
class Rule:
    """One refused family of combinations."""

    what: str
    """The refused combinations, in words."""
    when: Callable[[RunConfig], bool]
    """True for the configurations this rule refuses."""
    reason: str
    """Why they cannot work."""
    fix: str
    """What to change."""
    cell: bool = True
    """Decided by strategy x adapter x optimizer alone (shown in the grid); False: also precision or settings."""


def _zero(cfg: RunConfig) -> Zero | None:
    return cfg.strategy if isinstance(cfg.strategy, Zero) else None


RULES: list[Rule] = [
    Rule(
        "optimizer=cpu_adam without ZeRO optimizer offload",
        lambda c: c.optimizer.steps_offloaded_states and not c.strategy.offloads_optimizer,
        "cpu_adam is DeepSpeed's CPU Adam: it steps the optimizer states that ZeRO-Offload keeps on the CPU",
        "add strategy.offload_optimizer=cpu under a ZeRO strategy (strategy=zero2), or use optimizer=adamw",
    ),
    Rule(
        "ZeRO optimizer offload with an 8-bit optimizer",
        lambda c: c.strategy.offloads_optimizer and c.optimizer.eight_bit,
        "an 8-bit bitsandbytes optimizer cannot step optimizer states offloaded to the CPU",
        "use optimizer=cpu_adam with the offload, or drop strategy.offload_optimizer to keep the 8-bit optimizer",
    ),
    Rule(
        "FSDP2 parameter offload with an 8-bit optimizer",
        lambda c: isinstance(c.strategy, Fsdp) and c.strategy.offloads_parameters and c.optimizer.eight_bit,
        "an 8-bit bitsandbytes optimizer cannot step optimizer states offloaded to the CPU",
        "use optimizer=adamw with strategy.offload_params=cpu, or set strategy.offload_params=none",
    ),
    Rule(
        "ZeRO optimizer offload with optimizer=adamw",
        lambda c: c.strategy.offloads_optimizer and not (c.optimizer.eight_bit or c.optimizer.steps_offloaded_states),
        "ZeRO-Offload steps the offloaded optimizer states with DeepSpeed's CPU Adam, not torch's AdamW",
        "set optimizer=cpu_adam",
    ),
    Rule(
        "ZeRO parameter offload below stage 3",
        lambda c: (z := _zero(c)) is not None and z.offload_params != "none" and z.stage != 3,
        "ZeRO offloads parameters only at stage 3, where parameters are partitioned",
        "set strategy=zero3, or strategy.offload_params=none",
        cell=False,
    ),
    Rule(
        "ZeRO parameter offload without optimizer offload",
        lambda c: (z := _zero(c)) is not None and z.offload_params != "none" and z.offload_optimizer == "none",
        "parameter offload is supported together with optimizer offload (ZeRO-Infinity), not alone",
        "add strategy.offload_optimizer=cpu (and optimizer=cpu_adam)",
        cell=False,
    ),
    Rule(
        "a quantized base (qlora, lora8) with parameter offload",
        lambda c: c.adapter.quantized_base and c.strategy.offloads_parameters,
        "a bitsandbytes-quantized base computes on the device that holds it: it cannot be offloaded",
        "set strategy.offload_params=none (a 4-bit base is already small), or use adapter=lora",
    ),
    Rule(
        "adapter=lora8 under ZeRO-3 or FSDP2",
        lambda c: not c.adapter.shardable_base and c.strategy.shards_parameters,
        "an 8-bit base (Int8Params with its per-row scales) cannot be sharded by ZeRO-3 or FSDP2",
        "use adapter=qlora (a 4-bit base shards), or strategy=zero2 / strategy=ddp",
    ),
    Rule(
        "adapter=adalora under ZeRO-3 or FSDP2",
        lambda c: c.adapter.needs_whole_adapter and c.strategy.shards_parameters,
        "AdaLoRA prunes singular values by scores of the whole A, E and B matrices and their gradients after every "
        "step, and ZeRO-3 and FSDP2 leave each rank only its shard of them (peft's scores would be of the shards)",
        "use strategy=zero2 or strategy=ddp (the adapter's tensors are small), or adapter=lora",
    ),
    Rule(
        "adapter=qlora under ZeRO-3 or FSDP2 with adapter.quant_storage other than auto or the precision",
        lambda c: (
            isinstance(c.adapter, QLora)
            and c.strategy.shards_parameters
            and c.adapter.quant_storage not in ("auto", "fp32" if c.precision == "auto" else c.precision)
        ),
        "ZeRO-3 and FSDP2 shard and cast the packed 4-bit weights like every other parameter: their storage "
        "dtype must be the parameters' dtype (the precision), or the cast scrambles the packed bits",
        "set adapter.quant_storage=auto (it follows precision)",
        cell=False,
    ),
    Rule(
        "strategy.shard_group_size with strategy.shard=full",
        lambda c: isinstance(c.strategy, Fsdp) and c.strategy.shard == "full" and c.strategy.shard_group_size != 0,
        "strategy.shard_group_size only applies to hybrid sharding",
        "add strategy.shard=hybrid, or drop strategy.shard_group_size",
        cell=False,
    ),
    Rule(
        "train.adversarial (fgm, pgd) under ZeRO-3",
        lambda c: c.train.adversarial != "none" and isinstance(c.strategy, Zero) and c.strategy.shards_parameters,
        "the perturbation's direction is a backward pass to the word embeddings alone, and ZeRO-3's per-module "
        "hooks, which gather each block's partitioned parameters for backward, expect one backward per forward "
        "(they find the parameters partitioned)",
        "use strategy=fsdp (FSDP2 supports it) or strategy=zero2, or train.adversarial=none",
        cell=False,
    ),
    Rule(
        "NVMe offload without strategy.offload_dir",
        lambda c: (
            (z := _zero(c)) is not None and "nvme" in (z.offload_optimizer, z.offload_params) and not z.offload_dir
        ),
        "NVMe offload needs a folder to write to",
        "set strategy.offload_dir=/path/on/a/local/nvme/disk",
        cell=False,
    ),
]


def refusals(cfg: RunConfig) -> list[str]:
    """Every rule that refuses `cfg`, as one line each: what, why, and the fix."""
    return [f"{describe(cfg)} is not supported: {r.reason}; {r.fix}" for r in RULES if r.when(cfg)]


def describe(cfg: RunConfig) -> str:
    """The settings that place `cfg` in the table, e.g. 'strategy=zero3 (offload_optimizer=cpu), adapter=qlora'."""
    s = cfg.strategy
    extras = s.details()
    strategy = f"strategy={s.name}" + (f" ({', '.join(extras)})" if extras else "")
    training = f", train.adversarial={cfg.train.adversarial}" if cfg.train.adversarial != "none" else ""
    return f"{strategy}, adapter={cfg.adapter.name}, optimizer={cfg.optimizer.name}{training}"


@dataclass(frozen=True)
class Cell:
    row: str
    adapter: str
    optimizer: str
    overrides: tuple[str, ...]
    """The overrides that select this cell."""
    refused_by: tuple[int, ...]
    """Indexes into RULES of the rules that refuse it (empty: supported)."""

    @property
    def supported(self) -> bool:
        return not self.refused_by


def cells(base: RunConfig | None = None) -> Iterator[Cell]:
    """Every row x adapter x optimizer, decided by the cell rules (settings otherwise at their defaults)."""
    from launcher.overrides import apply_overrides

    base = base or RunConfig(model="m")
    for row, strategy in ROWS.items():
        for adapter in ADAPTERS:
            for optimizer in OPTIMIZERS:
                overrides = (*strategy, f"adapter={adapter}", f"optimizer={optimizer}")
                cfg = apply_overrides(base, list(overrides))
                refused = tuple(i for i, r in enumerate(RULES) if r.cell and r.when(cfg))
                yield Cell(row, adapter, optimizer, overrides, refused)

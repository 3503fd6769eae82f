"""What a rank holds of its model state, planned from the parameter counts alone (pure: no torch, no weights).

The terms are TERMS, measured the same way (`Engine.held_tensors`, between the last backward of a step and
its optimizer step): params, master, grads, optimizer, each split by where it lives ("gpu", or "cpu" for what an
offload keeps there; a CPU-only run holds both on the CPU). Each strategy's layout is DeepSpeed's or FSDP2's own:

- DDP: the whole model (fp32 outside quantized layers; autocast computes in low precision), gradients in DDP's
  buckets (the gradients are views into them), the optimizer over whole parameters.
- ZeRO-0: DeepSpeed's data parallel over the module in the precision's dtype; under bf16 or fp16 its optimizer
  steps whole fp32 copies of the trained parameters, under fp32 ours steps the module's own.
- ZeRO-1/2: the whole module in the precision's dtype, the trained parameters as flat buffers (one per optimizer
  group, each parameter padded to 16 bytes, the buffer to 2 x world elements); this rank's 1/world of each buffer as
  fp32 master weights, its reduced gradients, the optimizer states over that flat partition.
- ZeRO-3: each parameter's 1/world partition, parameters below the persistence threshold also whole; master,
  gradients and optimizer states over the trained partitions, one reduce bucket.
- FSDP2: each parameter's rows (dim 0 padded to the shard group), trained ones fp32 and frozen ones in the compute
  dtype; gradients and optimizer states of the trained rows.

A 4-bit weight is its packed bytes (sharded like any parameter) plus its quantization state (whole on every rank);
an 8-bit weight one byte per element plus an fp32 scale per row. An 8-bit optimizer keeps one byte per element for
each moment and an fp32 scale per block of 256, for tensors of at least min_8bit_size elements (DeepSpeed hands it
the flat partitions, so there the size is the partition's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from launcher.choices import (
    AdamW8bit,
    Ddp,
    Fsdp,
    QLora,
    Zero,
)
from launcher.choices.optimizers import decays
from launcher.config import RunConfig
from launcher.planning.counting import Counts, four_bit_constants, within

TERMS = ("params", "master", "grads", "optimizer")
"""params: the module's parameters and buffers as a rank stores them (a shard, a 4-bit packing with its quantization
constants); master: fp32 copies the optimizer steps instead of the parameters; grads: gradients and the buffers they
are reduced in; optimizer: the optimizer's state (Adam's moments, an 8-bit optimizer's codes and block scales)."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_BLOCK = 256
"""bitsandbytes' 8-bit optimizers: one fp32 scale per block of 256 elements."""
QMAP_BYTES = 2 * 256 * 4
"""The two 256-entry quantization maps an 8-bit optimizer shares across its tensors."""
ZERO3_SUB_GROUP_FLOOR = 10_000_000
"""zero_config: ZeRO-3 steps sub-groups of about a block, at least this many elements."""


@dataclass(frozen=True)
class Tensor:
    """A parameter as the run holds it."""

    name: str
    shape: tuple[int, ...]
    role: str
    """trained, frozen, nf4 (packed 4-bit) or int8."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decay(self) -> bool:
        return decays(self.name, len(self.shape))


@dataclass
class StateBytes:
    """Bytes per term and place ("gpu", "cpu") for one rank: planned here, measured by worker.holdings."""

    bytes: dict[str, dict[str, int]] = field(default_factory=lambda: {t: {} for t in TERMS})
    stepped: int = 0
    """Bytes of the largest tensor the optimizer steps at once (a parameter, a flat partition, a sub-group): the size
    of a CPU AdamW step's temporaries."""

    def add(self, term: str, n: float, where: str = "gpu") -> None:
        self.bytes[term][where] = self.bytes[term].get(where, 0) + int(n)

    def term(self, name: str) -> int:
        return sum(self.bytes[name].values())

    def total(self) -> int:
        return sum(self.term(t) for t in TERMS)

    def on(self, where: str) -> int:
        return sum(self.bytes[t].get(where, 0) for t in TERMS)


def tensors(counts: Counts, cfg: RunConfig, heads: tuple[str, ...] = ()) -> list[Tensor]:
    """The model's parameters once the adapter is applied: LoRA's A (r x in) and B (out x r) beside each target,
    DoRA's magnitude (out), a trained copy of each task head (peft's modules_to_save), the base linears of QLoRA and
    LoRA-8bit quantized (all but the output embedding and the heads)."""
    adapter = cfg.adapter
    if adapter.trains_base:
        return [Tensor(n, s, "trained") for n, s in counts.params]

    quantized = set()
    if adapter.quantized_base:
        quantized = {f"{lin.name}.weight" for lin in counts.linears if not within(lin.name, counts.skipped)}
    role = adapter.base_role
    head_modules = {m for m in counts.skipped if m.rsplit(".", 1)[-1] in heads}
    out = [Tensor(n, s, role if n in quantized else "frozen") for n, s in counts.params]
    out += [Tensor(f"{n}.modules_to_save", s, "trained") for n, s in counts.params if within(n, head_modules)]
    return out + [Tensor(*t) for t in adapter.trained_tensors(counts)]  # the adapter's own, by its own rule


def quantized_extra(t: Tensor, cfg: RunConfig) -> int:
    """The whole-on-every-rank constants of a quantized weight: 4-bit state, or the 8-bit scale per row."""
    if t.role == "nf4":
        assert isinstance(cfg.adapter, QLora)
        return four_bit_constants(t.numel, cfg.adapter.double_quant)
    if t.role == "int8":
        return 4 * t.shape[0]
    return 0


def stored_bytes(t: Tensor) -> float:
    """Bytes per element of a quantized weight (the packing); others are the caller's dtype."""
    return {"nf4": 0.5, "int8": 1}[t.role]


def optimizer_bytes(numel: int, cfg: RunConfig, element: int = 4) -> int:
    """One tensor's optimizer state: AdamW's two moments in the dtype of what it steps (`element` bytes), or 8-bit
    ones with their block scales."""
    opt = cfg.optimizer
    if isinstance(opt, AdamW8bit) and numel >= opt.min_8bit_size:
        return 2 * numel + 2 * 4 * math.ceil(numel / OPTIMIZER_BLOCK)
    return 2 * element * numel


def _eight_bit(cfg: RunConfig) -> bool:
    return isinstance(cfg.optimizer, AdamW8bit)


def _zero_grad_dtype(cfg: RunConfig) -> int:
    """DeepSpeed accumulates and partitions gradients in the model's dtype (its default grad_accum_dtype)."""
    return DTYPE_BYTES[cfg.precision]


def model_state(
    counts: Counts,
    cfg: RunConfig,
    world: int,
    local_world: int | None = None,
    heads: tuple[str, ...] = (),
) -> StateBytes:
    """One rank's model state for `cfg` on `world` processes (`local_world` per node: FSDP's hybrid groups)."""
    ts = tensors(counts, cfg, heads)
    strategy = cfg.strategy
    if isinstance(strategy, Ddp):
        return _ddp(ts, counts, cfg)
    if isinstance(strategy, Zero):
        return (_zero3 if strategy.stage == 3 else _zero12)(ts, counts, cfg, world)
    assert isinstance(strategy, Fsdp)
    group = world if strategy.shard == "full" else (strategy.shard_group_size or local_world or world)
    return _fsdp(ts, counts, cfg, group)


def _constants(ts: list[Tensor], counts: Counts, cfg: RunConfig) -> int:
    return counts.buffer_bytes + sum(quantized_extra(t, cfg) for t in ts)


def _optimizer_over(sizes: list[int], cfg: RunConfig, element: int = 4) -> int:
    return sum(optimizer_bytes(n, cfg, element) for n in sizes) + (QMAP_BYTES if _eight_bit(cfg) else 0)


def _ddp(ts: list[Tensor], counts: Counts, cfg: RunConfig) -> StateBytes:
    out = StateBytes()
    trained = [t.numel for t in ts if t.role == "trained"]
    out.add("params", sum(t.numel * (4 if t.role in ("trained", "frozen") else stored_bytes(t)) for t in ts))
    out.add("params", _constants(ts, counts, cfg))
    out.add("grads", 4 * sum(trained))
    out.add("optimizer", _optimizer_over(trained, cfg))
    out.stepped = 4 * max(trained, default=0)
    return out


def _flat_groups(ts: list[Tensor], element: int, world: int) -> list[int]:
    """ZeRO-1/2's flat buffers, one per optimizer group (decayed, then not): each parameter but the last padded to
    16 bytes, the whole to a multiple of 2 x world elements."""
    return [size for size, _ in _flat_layout(ts, element, world)]


def _flat_layout(ts: list[Tensor], element: int, world: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Each ZeRO-1/2 flat buffer's size and the (start, numel) of each parameter in it."""
    align = 16 // math.gcd(16, element)
    out = []
    for decay in (True, False):
        group = [t.numel for t in ts if t.role == "trained" and t.decay == decay]
        if not group:
            continue
        spans, start = [], 0
        for n in group:
            spans.append((start, n))
            start += n + (-n) % align
        total = spans[-1][0] + group[-1]
        out.append((total + (-total) % (2 * world), spans))
    return out


def _zero2_grad_elements(ts: list[Tensor], element: int, world: int) -> int:
    """ZeRO-2 copies the gradients of the parameters its partition touches into one buffer, each whole (a parameter
    across a partition boundary counts in both): the largest such sum over the ranks."""
    most = 0
    for rank in range(world):
        held = 0
        for size, spans in _flat_layout(ts, element, world):
            part = size // world
            lo, hi = rank * part, (rank + 1) * part
            held += sum(n for start, n in spans if start < hi and start + n > lo)
        most = max(most, held)
    return most


def _zero12(ts: list[Tensor], counts: Counts, cfg: RunConfig, world: int) -> StateBytes:
    strategy = cfg.strategy
    assert isinstance(strategy, Zero)
    out = StateBytes()
    low = DTYPE_BYTES[cfg.precision]
    offload = "cpu" if strategy.offloads_optimizer else "gpu"
    frozen = sum(t.numel * (low if t.role == "frozen" else stored_bytes(t)) for t in ts if t.role != "trained")
    out.add("params", frozen + _constants(ts, counts, cfg))
    if strategy.stage == 0:  # DeepSpeed's data parallel over the module, whole
        trained = [t.numel for t in ts if t.role == "trained"]
        out.add("params", low * sum(trained))
        out.add("grads", low * sum(trained))
        if cfg.precision != "fp32":  # its fp16/bf16 optimizer steps whole fp32 copies of the trained parameters
            out.add("master", 4 * sum(trained))
        out.add("optimizer", _optimizer_over(trained, cfg))
        out.stepped = 4 * max(trained, default=0)
        return out
    groups = _flat_groups(ts, low, world)
    partitions = [g // world for g in groups]
    out.add("params", low * sum(groups))
    out.add("master", 4 * sum(partitions), offload)
    out.add("optimizer", _optimizer_over(partitions, cfg), offload)
    out.stepped = 4 * max(partitions, default=0)
    if offload == "cpu":
        largest = max((t.numel for t in ts if t.role == "trained"), default=0)
        out.add("params", low * sum(partitions))  # the updated partition on its way back to the device
        out.add("grads", 4 * sum(partitions), "cpu")
        out.add("grads", 2 * low * largest)  # the copy buffers each gradient goes through
    elif strategy.stage == 2:
        out.add("grads", _zero_grad_dtype(cfg) * _zero2_grad_elements(ts, low, world))
    else:
        out.add("grads", _zero_grad_dtype(cfg) * sum(partitions))
    return out


def _zero3(ts: list[Tensor], counts: Counts, cfg: RunConfig, world: int) -> StateBytes:
    strategy = cfg.strategy
    assert isinstance(strategy, Zero)
    out = StateBytes()
    low = DTYPE_BYTES[cfg.precision]
    hidden = counts.hidden_size
    threshold = 10 * hidden  # zero_config's stage3_param_persistence_threshold
    offload = "cpu" if strategy.offloads_optimizer else "gpu"
    where = "cpu" if strategy.offload_params != "none" else "gpu"

    def elements(t: Tensor) -> int:  # as DeepSpeed counts it: a packed 4-bit weight by its packed elements
        return t.numel if t.role != "nf4" else math.ceil(t.numel / 2 / low)

    for t in ts:
        n = elements(t)
        out.add("params", low * math.ceil(n / world), where)
        if n < threshold:
            out.add("params", low * n)  # persistent: kept whole on every rank, besides its partition
    out.add("params", _constants(ts, counts, cfg))
    partition = sum(math.ceil(t.numel / world) for t in ts if t.role == "trained")
    out.add("master", 4 * partition, offload)
    out.add("grads", _zero_grad_dtype(cfg) * partition)
    out.add("grads", low * hidden * hidden)  # the reduce bucket (zero_config: reduce_bucket_size)
    if offload == "cpu":
        out.add("grads", 4 * partition, "cpu")
    sub_group = max(counts.largest_block, ZERO3_SUB_GROUP_FLOOR)
    sub_groups = [sub_group] * (partition // sub_group) + ([partition % sub_group] if partition % sub_group else [])
    out.add("optimizer", _optimizer_over(sub_groups, cfg), offload)
    out.stepped = 4 * max(sub_groups, default=0)
    return out


def _fsdp(ts: list[Tensor], counts: Counts, cfg: RunConfig, group: int) -> StateBytes:
    strategy = cfg.strategy
    assert isinstance(strategy, Fsdp)
    out = StateBytes()
    where = "cpu" if strategy.offload_params == "cpu" else "gpu"
    low = DTYPE_BYTES[cfg.precision]

    def rows(t: Tensor, element: int) -> int:
        """Elements of this rank's rows (dim 0 padded to the group); a packed 4-bit weight is (packed, 1)."""
        shape = t.shape if t.role != "nf4" else (math.ceil(t.numel / 2 / element), 1)
        return math.ceil(shape[0] / group) * math.prod(shape[1:])

    trained = []
    for t in ts:
        if t.role == "trained":
            n = rows(t, 4)
            trained.append(n)
            out.add("params", 4 * n, where)
        elif t.role == "nf4":
            out.add("params", low * rows(t, low), where)
        else:  # frozen in the compute dtype (built on meta: frozen_dtype); int8 is not sharded by FSDP here
            out.add("params", (low if t.role == "frozen" else stored_bytes(t)) * rows(t, low), where)
    out.add("params", _constants(ts, counts, cfg))
    out.add("grads", 4 * sum(trained), where)
    out.add("optimizer", _optimizer_over(trained, cfg), where)
    out.stepped = 4 * max(trained, default=0)
    return out

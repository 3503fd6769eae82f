"""`launcher plan`: what each candidate strategy needs per GPU and per node for a recipe's setup, before anything
is allocated (pure: the model is counted on the meta device from its config.json alone, launcher.planning.counting).

Per rank: the model state (launcher.planning.sizing, checked against measurement in tests/test_matrix.py), the largest
block gathered by ZeRO-3 and FSDP, the activations of one micro-batch, the optimizer step's temporaries, and an
allowance for what is not tensors of ours: ALLOWANCE_FIXED for the CUDA context, NCCL and cuBLAS workspaces, and
ALLOWANCE_SHARE of the rest for the caching allocator's fragmentation. Per node: what offload keeps on the CPU, for
each of its processes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from launcher.choices import Fsdp, Lora, Zero
from launcher.config import RunConfig
from launcher.data.tokens import DatasetTokens
from launcher.errors import ConfigError
from launcher.planning import timing
from launcher.planning.counting import Counts
from launcher.planning.sizing import DTYPE_BYTES, StateBytes, Tensor, model_state, stored_bytes, tensors

GiB = 2**30
ALLOWANCE_FIXED = GiB
"""Per GPU rank: CUDA context, NCCL buffers, cuBLAS workspace (about 0.5-1 GiB on H100s)."""
ALLOWANCE_SHARE = 0.10
"""Of the planned bytes: the caching allocator's fragmentation and small buffers."""
SAFETY = 0.90
"""A row is recommended only when it plans at most this share of the GPU (the margin for what no plan sees)."""

CANDIDATES: list[tuple[str, list[str]]] = [
    ("ddp", ["strategy=ddp"]),
    ("zero1", ["strategy=zero1"]),
    ("zero2", ["strategy=zero2"]),
    ("fsdp", ["strategy=fsdp"]),
    ("zero3", ["strategy=zero3"]),
    ("zero2+offload", ["strategy=zero2", "strategy.offload_optimizer=cpu", "optimizer=cpu_adam"]),
    ("zero3+offload", ["strategy=zero3", "strategy.offload_optimizer=cpu", "optimizer=cpu_adam"]),
    ("fsdp+offload", ["strategy=fsdp", "strategy.offload_params=cpu"]),
    (
        "zero3+offload-all",
        ["strategy=zero3", "strategy.offload_optimizer=cpu", "strategy.offload_params=cpu", "optimizer=cpu_adam"],
    ),
]
"""Every row of the table, cheapest first (less communication and no host round trips first): the recommended
row is the first that fits."""


@dataclass(frozen=True)
class Machine:
    """What the plan is for."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_bytes: int = 80 * GiB
    """Memory of one GPU."""
    cpu_bytes: int = 1024 * GiB
    """Host memory of one node."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Row:
    strategy: str
    overrides: list[str]
    state: StateBytes | None = None
    gathered: int = 0
    """The largest block, whole, as ZeRO-3 or FSDP gathers it (twice for FSDP: one block in use, one prefetched)."""
    activations: int = 0
    step: int = 0
    """The optimizer step's temporaries (ZeRO's fp32 gradient partition of a group)."""
    allowance: int = 0
    refused: str = ""
    """Why the launcher refuses this combination (empty: supported)."""
    epoch_seconds: float | None = None
    """One pass over the training tokens at this row's assumed utilisation (planning.timing; None: tokens unknown)."""

    @property
    def gpu_bytes(self) -> int:
        assert self.state is not None
        return self.state.on("gpu") + self.gathered + self.activations + self.step + self.allowance

    @property
    def rank_bytes(self) -> int:
        """All of it, wherever it lives: what a CPU rank (holding both places) needs."""
        assert self.state is not None
        return self.gpu_bytes + self.state.on("cpu")

    def as_json(self, machine: Machine) -> dict:
        if self.state is None:
            return {"strategy": self.strategy, "overrides": self.overrides, "refused": self.refused}
        return {
            "strategy": self.strategy,
            "overrides": self.overrides,
            "model_state_bytes_per_rank": self.state.total(),
            "activation_bytes_per_rank": self.activations,
            "gpu_bytes_per_rank": self.gpu_bytes,
            "cpu_bytes_per_node": self.state.on("cpu") * machine.gpus_per_node,
            "fits": fits(self, machine),
            "epoch_seconds": round(self.epoch_seconds, 3) if self.epoch_seconds is not None else None,
            "terms": {
                **{t: self.state.bytes[t] for t in self.state.bytes},
                "gathered": self.gathered,
                "activations": self.activations,
                "step": self.step,
                "allowance": self.allowance,
            },
        }


@dataclass
class MemoryPlan:
    machine: Machine
    model: str
    precision: str
    adapter: str
    optimizer: str
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    parameters: int
    trainable: int
    rows: list[Row] = field(default_factory=list)
    recommended: str | None = None
    limits: dict = field(default_factory=dict)
    """For the recommended row: the largest micro-batch at seq_len and the longest sequence at micro_batch."""
    named: dict = field(default_factory=dict)
    """The same for the row the user named (--row), with its name under "row"."""
    verify: dict = field(default_factory=dict)
    """What `--verify` measured against the plan (launcher.planning.probe.compare), with what it ran."""
    flops: dict = field(default_factory=dict)
    """Training FLOPs per token and their parts (launcher.planning.timing.flops_per_token)."""
    tokens: dict = field(default_factory=dict)
    """The training split's tokens, examples, source and note (launcher.data.tokens.DatasetTokens)."""
    peak_tflops: float = 0.0
    """One GPU's peak the times are computed against."""

    def row(self, name: str) -> Row:
        found = next((r for r in self.rows if r.strategy == name), None)
        if found is None:
            raise ConfigError(f"--row {name}: no such row; the rows are {', '.join(r.strategy for r in self.rows)}")
        return found

    def as_json(self) -> dict:
        return {
            "model": self.model,
            "machine": dataclasses.asdict(self.machine),
            "precision": self.precision,
            "adapter": self.adapter,
            "optimizer": self.optimizer,
            "micro_batch_size": self.micro_batch,
            "seq_len": self.seq_len,
            "activation_checkpointing": self.activation_checkpointing,
            "parameters": self.parameters,
            "trainable_parameters": self.trainable,
            "rows": [r.as_json(self.machine) for r in self.rows],
            "recommended": self.recommended,
            **self.limits,
            "flops_per_token": self.flops,
            "tokens": self.tokens,
            "peak_tflops": self.peak_tflops,
            **({"named_row": self.named} if self.named else {}),
            **({"verify": self.verify} if self.verify else {}),
        }


def fits(row: Row, machine: Machine, share: float = 1.0) -> bool:
    return (
        row.state is not None
        and row.gpu_bytes <= share * machine.gpu_bytes
        and row.state.on("cpu") * machine.gpus_per_node <= share * machine.cpu_bytes
    )


def activation_bytes(counts: Counts, config: dict, cfg: RunConfig, micro_batch: int, seq_len: int) -> int:
    """One micro-batch's activations kept for backward, per rank, from the real shapes (a documented estimate,
    docs/planning.md): per token and layer, in the compute dtype, the block input and the attention and MLP
    tensors autograd saves (norm outputs, q, k and v, the attention output, a gated MLP's four intermediate tensors
    or a plain one's two) plus fp32 copies made by the norms; LoRA adds each target's dropped-out input (when
    dropout is on) and its rank-r projection; the logits in the compute dtype and 8 more bytes per element (the
    loss's fp32 copy, which fp32 logits need not make, and its log-softmax, later its gradient; kernels.fused_ce: one
    chunk of them and the hidden states' gradient). With activation
    checkpointing a layer keeps only its input, and one layer at a time holds the rest again while it is recomputed."""
    e = DTYPE_BYTES[cfg.precision]
    h = config.get("hidden_size", 0)
    i = config.get("intermediate_size", 4 * h)
    heads = config.get("num_attention_heads", 1)
    kv = config.get("num_key_value_heads", heads) * config.get("head_dim", h // heads)
    layers = config.get("num_hidden_layers", 1)
    vocab = config.get("vocab_size", 0)
    gated = any(lin.name.endswith("gate_proj") for lin in counts.linears)
    per_layer = e * (5 * h + 4 * kv + (4 if gated else 2) * i) + 2 * 4 * h
    adapter = cfg.adapter
    if isinstance(adapter, Lora):
        targets = counts.targets(adapter.target_modules)
        per_block = [t for t in targets if re.search(r"\.0\.", t.name)]
        dropout = getattr(adapter, "dropout", 0) > 0
        per_layer += e * sum((t.in_features if dropout else 0) + adapter.r for t in per_block)
    tokens = micro_batch * seq_len
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures", []))
    # fp32 logits are the loss's input as they are; lower precision ones get an fp32 copy first (transformers' loss)
    logits = tokens * vocab * ((e if e != 4 else 0) + 8) if causal else 0
    if causal and getattr(getattr(cfg, "kernels", None), "fused_ce", False):
        from launcher.kernels.fused_ce import CHUNK_BYTES

        # The fused loss: one chunk of fp32 logits at a time, and the hidden states' gradient it keeps for backward.
        logits = min(CHUNK_BYTES, tokens * vocab * 4) + tokens * h * e
    if cfg.activation_checkpointing:
        return tokens * (layers * e * h + per_layer) + logits
    return tokens * layers * per_layer + logits


def _units(ts: list[Tensor]) -> list[list[Tensor]]:
    """What ZeRO-3 and FSDP gather at once: each repeated block (`...layers.N.`), and each parameter outside the
    blocks on its own (FSDP shards the vocabulary matrices as units of their own; ZeRO-3 fetches per module)."""
    blocks: dict[str, list[Tensor]] = {}
    for t in ts:
        m = re.match(r"(.*?\.\d+)\.", t.name)
        blocks.setdefault(m.group(1) if m else t.name, []).append(t)
    return list(blocks.values())


def gathered_bytes(ts: list[Tensor], cfg: RunConfig) -> int:
    """ZeRO-3 and FSDP gather a unit whole for its forward and backward, and its gradients are whole until reduced:
    the largest unit's bytes as stored (low precision, a 4-bit weight packed), once under ZeRO-3 (its live-parameter
    limit is one block) and twice under FSDP (the next unit is prefetched), plus its trained part's whole gradient
    (fp32 under FSDP, whose reduce dtype it is; the model's dtype under ZeRO-3). A vocabulary matrix is often the
    largest unit (Llama-3-8B's: 525M elements, a block 218M)."""
    s = cfg.strategy
    sharded = (isinstance(s, Zero) and s.stage == 3) or (isinstance(s, Fsdp) and s.shard == "full")
    if not sharded:
        return 0
    low = DTYPE_BYTES[cfg.precision]
    fsdp = isinstance(s, Fsdp)

    def unit_bytes(unit: list[Tensor]) -> float:
        stored = sum(t.numel * (low if t.role in ("trained", "frozen") else stored_bytes(t)) for t in unit)
        grads = sum(t.numel for t in unit if t.role == "trained") * (4 if fsdp else low)
        return stored * (2 if fsdp else 1) + grads

    return int(max((unit_bytes(u) for u in _units(ts)), default=0))


def step_bytes(state: StateBytes, cfg: RunConfig, trainable: int, gpu: bool = True) -> int:
    """What the step holds for a moment beyond the model state: ZeRO-1/2/3 make an fp32 copy of the gradient
    partition of the group (or sub-group) being stepped, and ZeRO-1 keeps each gradient whole until backward ends
    (ZeRO-2 reduces them bucket by bucket). On the GPU our AdamW is fused and steps in place; on a CPU rank torch
    steps one tensor at a time (its foreach kernels are for GPUs), and the denominator it builds for each is two
    temporaries the size of that tensor (measured: 190 MiB above the state for one 95 MiB tensor)."""
    s = cfg.strategy
    out = 0
    if not gpu and cfg.optimizer.name == "adamw":
        out += 2 * state.stepped
    if not isinstance(s, Zero) or s.stage == 0 or s.offloads_optimizer:
        return out
    copy = state.bytes["master"].get("gpu", 0)
    return out + (max(copy, DTYPE_BYTES[cfg.precision] * trainable) if s.stage == 1 else copy)


def make_plan(
    cfg: RunConfig,
    counts: Counts,
    config: dict,
    machine: Machine,
    seq_len: int,
    candidates: list[tuple[str, list[str]]] | None = None,
    named: str | None = None,
    tokens: DatasetTokens | None = None,
    peak_tflops: float = timing.PEAK_TFLOPS,
) -> MemoryPlan:
    """Every candidate row for `cfg`'s adapter and optimizer (an offload row uses cpu_adam), its bytes, whether it
    fits, its time per epoch over `tokens`, the recommended row and how far it goes (and the row called `named`,
    when given)."""
    from launcher.overrides import apply_overrides

    ts = tensors(counts, cfg)
    plan = MemoryPlan(
        machine=machine,
        model=cfg.model,
        precision=cfg.precision,
        adapter=cfg.adapter.name,
        optimizer=cfg.optimizer.name,
        micro_batch=cfg.train.micro_batch_size,
        seq_len=seq_len,
        activation_checkpointing=cfg.activation_checkpointing,
        parameters=counts.total,
        trainable=sum(t.numel for t in ts if t.role == "trained"),
    )
    for name, overrides in candidates or CANDIDATES:
        if "optimizer=cpu_adam" not in overrides and cfg.optimizer.name == "cpu_adam":
            overrides = [*overrides, "optimizer=adamw"]  # cpu_adam steps only what ZeRO-Offload keeps on the CPU
        plan.rows.append(plan_row(name, overrides, cfg, counts, config, machine, seq_len))
    plan.flops = timing.flops_per_token(counts, config, cfg, seq_len)
    plan.peak_tflops = peak_tflops
    if tokens is not None:
        plan.tokens = dataclasses.asdict(tokens)
        for row in plan.rows:
            if row.state is not None and tokens.tokens and row.strategy in timing.UTILISATION:
                quantized = cfg.adapter.quantized_base
                row.epoch_seconds = timing.epoch_seconds(
                    plan.flops, tokens.tokens, machine.world, row.strategy, quantized, peak_tflops
                )
    best = next((r for r in plan.rows if r.state is not None and fits(r, machine, SAFETY)), None)
    if best is not None:
        plan.recommended = best.strategy
        plan.limits = _limits(best, counts, config, apply_overrides(cfg, best.overrides), machine, plan)
    if named is not None:
        row = plan.row(named)
        if row.state is None:
            raise ConfigError(f"--row {named}: {row.refused}")
        plan.named = {"row": named, **_limits(row, counts, config, apply_overrides(cfg, row.overrides), machine, plan)}
    return plan


def plan_row(
    name: str,
    overrides: list[str],
    cfg: RunConfig,
    counts: Counts,
    config: dict,
    machine: Machine,
    seq_len: int,
    gpu: bool = True,
) -> Row:
    """One rank of `cfg` with `overrides` on `machine` (`gpu`=False: a CPU rank, with no CUDA context to allow for)."""
    from launcher.compat import refusals
    from launcher.overrides import apply_overrides

    row_cfg = apply_overrides(cfg, overrides)
    row = Row(name, overrides)
    refused = refusals(row_cfg)
    if refused:
        row.refused = refused[0]
        return row
    ts = tensors(counts, row_cfg)
    row.state = model_state(counts, row_cfg, machine.world, machine.gpus_per_node)
    row.gathered = gathered_bytes(ts, row_cfg)
    row.activations = activation_bytes(counts, config, row_cfg, row_cfg.train.micro_batch_size, seq_len)
    row.step = step_bytes(row.state, row_cfg, sum(t.numel for t in ts if t.role == "trained"), gpu)
    row.allowance = allowance(row.gpu_bytes, gpu)
    return row


def allowance(planned: int, gpu: bool = True) -> int:
    return (ALLOWANCE_FIXED if gpu else 0) + int(ALLOWANCE_SHARE * planned)


def _limits(row: Row, counts: Counts, config: dict, cfg: RunConfig, machine: Machine, plan: MemoryPlan) -> dict:
    """Activations grow linearly with the micro-batch and (memory-efficient attention) with the sequence: the
    largest of each that keeps the row within the safety margin, the other held at the plan's value."""
    assert row.state is not None
    budget = (SAFETY * machine.gpu_bytes - ALLOWANCE_FIXED) / (1 + ALLOWANCE_SHARE)
    room = budget - (row.state.on("gpu") + row.gathered + row.step)
    per_sample = activation_bytes(counts, config, cfg, 1, plan.seq_len)
    per_token = activation_bytes(counts, config, cfg, plan.micro_batch, 1)
    return {
        "max_micro_batch_size": max(0, math.floor(room / per_sample)) if per_sample else None,
        "max_seq_len": max(0, math.floor(room / per_token)) if per_token else None,
    }

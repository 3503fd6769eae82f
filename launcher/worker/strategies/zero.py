"""DeepSpeed ZeRO stages 0-3 through `deepspeed.initialize`, with our optimizer and schedule as clients."""

from __future__ import annotations

import contextlib
import io
import sys

import deepspeed
import torch

from launcher.choices import Zero
from launcher.worker import eight_bit, holdings
from launcher.worker.adapters import precision_dtype
from launcher.worker.strategies.base import Engine, EngineInputs, StepResult, current_lr, local_state_dict
from launcher.worker.strategies.zero_config import deepspeed_config
from launcher.worker.strategies.zero_four_bit import release_4bit_weights_after_use
from launcher.worker.weights import materialize, move_real


class ZeroEngine(Engine):
    def __init__(self, inputs: EngineInputs):
        cfg = inputs.cfg
        assert isinstance(cfg.strategy, Zero)
        self.device = inputs.device
        self.stage = cfg.strategy.stage
        world = torch.distributed.get_world_size()
        config = deepspeed_config(
            cfg,
            world,
            cuda=self.device.type == "cuda",
            hidden_size=_hidden_size(inputs.model),
            block_numel=_largest_block_numel(inputs.model, inputs.block_types),
        )
        if inputs.weights is None:
            self.module = inputs.model.to(self.device)
        elif self.stage < 3:  # every rank keeps the whole module; ZeRO-1/2 shard only optimizer state and gradients
            dtype = precision_dtype(cfg.precision)
            materialize(inputs.model, inputs.weights, self.device, lambda _: dtype)
            self.module = inputs.model.to(self.device)
        else:
            with _without_build_lines():
                self.module = _load_partitioned(move_real(inputs.model, self.device), inputs, config)
        if self.stage == 3:
            release_4bit_weights_after_use(self.module)
        optimizer, scheduler = inputs.make_optimizer(self.module)
        with _without_build_lines():
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.module,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=config,
                dist_init_required=False,
            )
        self._lr_source = optimizer

    def forward(self, batch):
        return self.ds(**batch)

    def train_step(self, micro_batches):
        lr = current_lr(self._lr_source)
        total = None
        for i, batch in enumerate(micro_batches):
            loss, shown = self.hooks.micro_loss(
                lambda b: self.ds(**b), batch, _no_sync, True, probe=lambda b: self.module(**b)
            )
            self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            if i == len(micro_batches) - 1:
                self.hooks.before_step()
            self.ds.step()  # a no-op until the accumulation boundary
            total = shown.detach() if total is None else total + shown.detach()
        norm = self.ds.get_global_grad_norm()  # a tensor on the device, or a float DeepSpeed already read
        return StepResult(
            loss=total / len(micro_batches),
            grad_norm=None if norm is None else torch.as_tensor(norm).detach(),
            lr=lr,
            skipped=not self.ds.was_step_applied(),  # fp16: DeepSpeed's loss scaler skipped an overflow step
        )

    def train(self, mode=True):
        self.ds.train(mode)

    def gathered_state_dict(self, trainable_only):
        if self.stage < 3:
            return local_state_dict(self.module, trainable_only)
        # ZeRO-3 keeps only a shard of each parameter; gather them, or the saved adapter would hold
        # empty placeholders (the well-known 40-byte adapter).
        params = [p for p in self.module.parameters() if p.requires_grad or not trainable_only]
        # A prefetch for a forward that never came (the last eval batch) may still be in flight, and a gathered
        # context cannot partition such a parameter afterwards: wait for them and partition everything first.
        self.ds.empty_partition_cache()
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return local_state_dict(self.module, trainable_only)

    def full_tensors(self):
        if self.stage == 3:
            self.ds.empty_partition_cache()  # once, before the first gather: see gathered_state_dict
        yield from super().full_tensors()

    @contextlib.contextmanager
    def whole(self, tensor):
        if self.stage < 3:
            yield tensor
            return
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):  # a no-op for a buffer
            yield tensor.data

    # Checkpoints: ZeRO-1/2/3 (and bf16) keep fp32 master weights and Adam moments in flat partitions of their own;
    # DeepSpeed's tensor-fragment API gathers and scatters them per parameter (collective). Stage 0 in fp32 steps
    # the module's own parameters with our optimizer: the Engine defaults.

    def trained_value(self, p):
        if not _partitioned(p):
            return super().trained_value(p)
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach().to("cpu", copy=True).reshape(_whole_shape(p)).contiguous()

    def trained_grad(self, p):
        if not _partitioned(p):
            return super().trained_grad(p)
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)  # ZeRO-1/2: this rank's reduced fragment, all-reduced into the whole

    def set_trained(self, p, value):
        if not _partitioned(p):
            return super().set_trained(p, value)
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.to(self.device))
        # ... and the module's own (low-precision or partitioned) copy, which the next forward uses.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.copy_(value.to(p.dtype))

    def optimizer_state(self, p):
        if not _partitioned(p):
            return super().optimizer_state(p)
        from deepspeed.utils import safe_get_full_optimizer_state

        sample = _flat_state(self.optimizer, p)
        out = {
            k: safe_get_full_optimizer_state(p, k).reshape(_whole_shape(p))
            for k in sorted(sample)
            if torch.is_tensor(sample[k]) and sample[k].dim() > 0
        }
        if "step" in sample:  # one count per flat partition, the same for all of them
            out["step"] = sample["step"]
        return out

    def set_optimizer_state(self, p, state):
        if not _partitioned(p):
            return super().set_optimizer_state(p, state)
        from deepspeed.utils import safe_set_full_optimizer_state

        if _ensure_states(self.optimizer, state):
            _link_fragments(self.optimizer)
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                safe_set_full_optimizer_state(p, value.to(self.device), key)
        if "step" in state:
            for st in _inner(self.optimizer).state.values():
                st["step"] = state["step"].clone() if torch.is_tensor(state["step"]) else state["step"]

    def train_state(self):
        scalars, tensors = super().train_state()
        scalars["deepspeed_loss_scaler"] = scaler_state(self.optimizer)  # fp16: its dynamic loss scale
        return scalars, self._per_parameter(tensors)

    def _per_parameter(self, tensors):
        """`tensors` iterated with the flat partitions' states readable per parameter: an 8-bit optimizer's
        dequantized (its codes are blocked over the whole partition), and every parameter linked to its fragment."""
        with eight_bit.dequantized_states(_inner(self.optimizer)):
            _link_fragments(self.optimizer)
            yield from tensors
        _link_fragments(self.optimizer)

    def load_train_state(self, scalars, keys, tensor):
        _link_fragments(self.optimizer)
        super().load_train_state(scalars, keys, tensor)
        if eight_bit.is_eight_bit(self.optimizer):  # the states were set per parameter in fp32: quantize them
            eight_bit.requantize_states(_inner(self.optimizer))
            _link_fragments(self.optimizer)
        set_scaler_state(self.optimizer, scalars.get("deepspeed_loss_scaler"))
        # DeepSpeed counts steps itself (its accumulation boundary, its logging); the run goes on from this one.
        steps = scalars["scheduler"].get("last_epoch", 0)
        self.ds.global_steps = steps
        self.ds.micro_steps = steps * self.ds.gradient_accumulation_steps()

    def stepping_optimizer(self):
        return _inner(self.optimizer)

    def held_tensors(self):
        held = super().held_tensors()
        if self.stage == 3:  # each parameter's partition; the parameter itself is an empty placeholder
            held["params"] += [p.ds_tensor for p in self.module.parameters() if hasattr(p, "ds_tensor")]
        wrapper = self.optimizer if self.optimizer is not self.stepping_optimizer() else None
        for name, value in vars(wrapper).items() if wrapper is not None else ():  # the ZeRO optimizer's own buffers
            if name in _PARAM_BUFFERS:
                held["params"] += holdings.tensors_of(value)
            elif name in _MASTER_WEIGHTS:
                masters = list(holdings.tensors_of(value))
                held["master"] = held.get("master", []) + masters
                held["grads"] += [m.grad for m in masters if m.grad is not None]
            elif name == "ipg_buckets":  # the buckets gradients are reduced in, per dtype
                held["grads"] += [t for bucket in value.values() for t in holdings.tensors_of(bucket.buffer)]
            elif name not in _NOT_STATE:
                held["grads"] += holdings.tensors_of(value)  # the rest are gradients, whole or partitioned, flat
        return held

    def trainable_numel(self):
        # ZeRO-3 leaves an empty placeholder in each parameter; ds_numel is its whole size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters() if p.requires_grad)


def _load_partitioned(module: torch.nn.Module, inputs: EngineInputs, config: dict) -> torch.nn.Module:
    """ZeRO-3 on a model built on meta: one unit at a time (a transformer block, or a module outside the blocks), its
    parameters are made whole and partitioned at once (`zero.Init(module=...)`, as if built inside zero.Init), so a
    rank holds its partitions plus one unit. Only rank 0 reads: partitioning starts by broadcasting each parameter
    from rank 0, so the other ranks just allocate."""
    cfg, weights = inputs.cfg, inputs.weights
    assert weights is not None
    dtype = precision_dtype(cfg.precision)
    reads = torch.distributed.get_rank() == 0
    offload = cfg.strategy.offload_params
    # Init reads only the ZeRO and precision sections; it checks the batch sizes against a world it may see as 1.
    init_config = {k: v for k, v in config.items() if k != "train_batch_size"}
    names = {id(m): n for n, m in module.named_modules()}
    blocks = [m for m in module.modules() if isinstance(m, inputs.block_types)]
    inside = {id(p) for b in blocks for p in b.parameters()}
    units = blocks + [
        m for m in module.modules() if any(id(p) not in inside and p.device.type == "meta" for p in m.parameters(False))
    ]
    # A parameter tied across units (an output embedding that is the input embedding) is made and partitioned with
    # the first unit that holds it; the later one takes that same parameter.
    made: dict[int, torch.nn.Parameter] = {}
    for unit in units:
        if materialize(unit, weights, inputs.device, lambda _: dtype, prefix=names[id(unit)], read=reads, made=made):
            deepspeed.zero.Init(
                module=unit,
                config_dict_or_path=init_config,
                dtype=dtype,
                remote_device=offload if offload != "none" else None,
                mem_efficient_linear=False,
            )
    return module


SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""What DeepSpeed's dynamic loss scaler (fp16) has learnt: the scale, and where it is in its window."""


def scaler_state(optimizer) -> dict | None:
    """The ZeRO optimizer's dynamic loss-scaler state as plain numbers (None without one: bf16, fp32)."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return None
    return {
        k: float(v) if k == "cur_scale" else int(v) for k in SCALER_STATE if (v := getattr(scaler, k, None)) is not None
    }


def set_scaler_state(optimizer, state: dict | None) -> None:
    scaler = getattr(optimizer, "loss_scaler", None)
    if state and scaler is not None and getattr(scaler, "dynamic", False):
        for key, value in state.items():
            setattr(scaler, key, value)


_PARAM_BUFFERS = (
    "bit16_groups_flat",  # ZeRO-1/2: the trained parameters, flat, whole; the module's are views into it
    "bf16_groups_flat",  # stage 0's bf16 optimizer: the same
    "lp_param_buffer",  # ZeRO-3: this rank's partitions of the parameters, flat
    "fp16_partitioned_groups_flat",
    "param_buffer_of_bit16_for_cpu_offload_groups",  # ZeRO-1/2 offload: the updated partition on its way back
)
_MASTER_WEIGHTS = (
    "single_partition_of_fp32_groups",  # ZeRO-1/2
    "fp32_partitioned_groups_flat",  # ZeRO-3
    "fp32_groups_flat_partition",  # stage 0's bf16 optimizer with fp32 gradient accumulation
    "fp32_groups",  # stage 0's fp16/bf16 optimizer: whole fp32 copies
)
_NOT_STATE = ("optimizer", "module", "param_names", "param_dict", "loss_scaler")
"""Attributes of a ZeRO optimizer that hold no buffers of its own (the client optimizer, the model)."""


def _partitioned(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps this parameter's fp32 master and optimizer state in its own flat partitions."""
    # Every rank's parameters carry `_hp_mapping` (None where a rank owns no fragment): the test must agree across
    # ranks, since the fragment API is collective.
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _whole_shape(p: torch.nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _ensure_states(optimizer, like: dict) -> bool:
    """Give every flat partition's optimizer state the keys of `like` (a checkpoint's, for one parameter) that it
    lacks, zeros until they are set; returns whether any was made. A fresh ZeRO optimizer makes its states in its
    first step, and a resumed run must set them before that step. (Parameters may bring different keys: an 8-bit
    optimizer's small partitions have no block scales.)"""
    inner = _inner(optimizer)
    # ZeRO-3 hands its inner optimizer one sub-group's partition at a time (param_groups are empty between steps).
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None) or getattr(
        optimizer, "single_partition_of_fp32_groups", None
    )
    if flats is None:
        flats = [p for group in inner.param_groups for p in group["params"]]
    made = False
    for flat in flats:
        state = inner.state.setdefault(flat, {})
        for k, v in like.items():
            if k not in state:
                made = True
                state[k] = (
                    torch.zeros_like(flat)
                    if torch.is_tensor(v) and v.dim() > 0
                    else (v.clone() if torch.is_tensor(v) else v)
                )
    return made


def _link_fragments(optimizer) -> None:
    """Let every parameter find its optimizer state. ZeRO-1/2 link each parameter to its fragment of the flat
    partitions' states once, right after the first parameter group's first step: the other groups (ours without
    weight decay) had no state yet, so their parameters were left unlinked ("exp_avg not found in optimizer state
    fragment"). Linking again, once every group has state, is what DeepSpeed does for each group (idempotent)."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _flat_state(optimizer, p: torch.nn.Parameter) -> dict:
    """The optimizer state of the flat partition that holds `p`'s fp32 master: its keys are `p`'s (an 8-bit
    optimizer keeps a partition smaller than its min_8bit_size in fp32, without block scales). Every rank has a
    partition of each group, with the same keys."""
    inner = _inner(optimizer)
    if hasattr(p, "ds_id"):  # ZeRO-3: each parameter's partition lies in one sub-group's flat tensor
        group = optimizer.grad_position[optimizer.get_param_id(p)][0]
        return inner.state.get(optimizer.fp32_partitioned_groups_flat[group], {})
    for groups, flats in (
        ("bit16_groups", "single_partition_of_fp32_groups"),
        ("bf16_groups", "fp32_groups_flat_partition"),
    ):
        if hasattr(optimizer, groups):  # ZeRO-1/2, or stage 0's bf16 optimizer
            for params, flat in zip(getattr(optimizer, groups), getattr(optimizer, flats), strict=True):
                if any(q is p for q in params):
                    return inner.state.get(flat, {})
    return next(iter(inner.state.values()), {})


def _inner(optimizer):
    """The optimizer that steps the flat partitions (ours), inside DeepSpeed's ZeRO optimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def _largest_block_numel(module: torch.nn.Module, block_types: tuple[type, ...]) -> int | None:
    """Elements of the largest transformer block, before partitioning (meta parameters count their size)."""
    sizes = [sum(p.numel() for p in m.parameters()) for m in module.modules() if isinstance(m, block_types)]
    return max(sizes) if sizes else None


def _hidden_size(module: torch.nn.Module) -> int | None:
    config = getattr(module, "config", None)
    return getattr(config, "hidden_size", None) if config is not None else None


def wrap(inputs: EngineInputs) -> Engine:
    return ZeroEngine(inputs)


def _no_sync(sync: bool) -> None:
    """DeepSpeed decides when gradients are reduced (at its accumulation boundary): nothing to set."""


@contextlib.contextmanager
def _without_build_lines():
    """DeepSpeed prints "DeepSpeed <op> built successfully" on every rank as its communication backend loads an op
    (the shared-memory collectives): noise on every run. What else it prints meanwhile is passed on."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True) if "built successfully" not in line]
        sys.stdout.write("".join(kept))

"""PyTorch FSDP2: `fully_shard` on each transformer block, then the root; parameters are DTensors.

Full shard splits every parameter over all ranks; hybrid shard splits inside groups of `shard_group_size`
ranks (a node) and replicates across groups (HSDP: a 2-D mesh, gradients reduce-scattered inside a group and
all-reduced across groups). CPU offload keeps shards, gradients and the optimizer step on the CPU."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from launcher.choices import Fsdp
from launcher.worker import eight_bit
from launcher.worker.strategies.base import Engine, EngineInputs, accumulate_and_step, compute_dtype, frozen_dtype
from launcher.worker.weights import Weights, move_real, replace_meta


def shard_group_size(strategy: Fsdp, world: int, local_world: int) -> int:
    if strategy.shard == "full":
        return world
    return strategy.shard_group_size or local_world


def device_mesh(strategy: Fsdp, device_type: str, world: int, local_world: int) -> DeviceMesh:
    group = shard_group_size(strategy, world, local_world)
    if strategy.shard == "full":
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (world // group, group), mesh_dim_names=("replicate", "shard"))


class FsdpEngine(Engine):
    def __init__(self, inputs: EngineInputs):
        cfg = inputs.cfg
        strategy = cfg.strategy
        assert isinstance(strategy, Fsdp)
        self.device = inputs.device
        offload = strategy.offload_params == "cpu"
        # Offloaded shards stay on the CPU; FSDP copies each block to the device for its forward and backward.
        self.module = inputs.model if offload else move_real(inputs.model, self.device)
        mesh = device_mesh(strategy, self.device.type, torch.distributed.get_world_size(), inputs.local_world_size)
        dtype = compute_dtype(cfg.precision)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
        policy = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offload else OffloadPolicy()
        kwargs = dict(
            mesh=mesh, mp_policy=mp, reshard_after_forward=strategy.reshard_after_forward, offload_policy=policy
        )
        # peft's prompt learning calls the word embeddings itself, outside the module that holds them (BERT's
        # embeddings block): they are their own unit, sharded first, so that the call gathers them.
        called_alone = getattr(self.module, "word_embeddings", None)
        if isinstance(called_alone, torch.nn.Module):
            fully_shard(called_alone, **kwargs)
        for block in [m for m in self.module.modules() if isinstance(m, inputs.block_types)]:
            fully_shard(block, **kwargs)
        # The vocabulary matrices are an LLM's largest parameters (Llama-3-8B: 525M each). Left to the root they would
        # stay gathered for the whole step; as their own units they are gathered only while used (as torchtitan does).
        for vocab in _vocabulary_modules(self.module):
            if not any(isinstance(p, DTensor) for p in vocab.parameters()):  # not inside a block (BertEmbeddings is)
                fully_shard(vocab, **kwargs)
        fully_shard(self.module, **kwargs)
        if inputs.weights is not None:  # built on meta: each rank reads only its rows of each parameter
            where = torch.device("cpu") if offload else self.device
            _load_shards(self.module, inputs.weights, frozen_dtype(cfg.precision), where)
        # Over the sharded parameters; optimizers that take plain tensors only get views of the local shards.
        self._plain: dict[int, torch.nn.Parameter] = {}
        """A sharded parameter's plain view, by id, where the optimizer was given one (its state is keyed by it)."""
        self.optimizer, self.scheduler = inputs.make_optimizer(
            self.module, functools.partial(plain_local_shards, into=self._plain)
        )
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.max_grad_norm = cfg.train.max_grad_norm
        self.scaler = None
        if cfg.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            # Each rank holds different gradient shards: the overflow check must be agreed across ranks.
            self.scaler = ShardedGradScaler(device=self.device.type)

    def forward(self, batch):
        return self.module(**batch)

    def train_step(self, micro_batches):
        return accumulate_and_step(
            micro_batches,
            forward=self.forward,
            set_sync=self.module.set_requires_gradient_sync,  # reduce-scatter only on the last micro-batch
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            params=self.params,
            max_grad_norm=self.max_grad_norm,
            scaler=self.scaler,
            clip=clip_sharded_norm,
            before_step=self.hooks.before_step,
            micro_loss=self.hooks.micro_loss,
        )

    def train(self, mode=True):
        self.module.train(mode)

    def gathered_state_dict(self, trainable_only):
        if trainable_only:
            # One parameter at a time, only the trained ones: an adapter's save never gathers the frozen base
            # (which would put a whole copy of the model on rank 0). Collective: every rank, the same order.
            main = torch.distributed.get_rank() == 0
            out = {}
            for name, p in self.module.named_parameters():
                if p.requires_grad:
                    full = p.full_tensor() if isinstance(p, DTensor) else p
                    if main:
                        out[name] = full.detach().to("cpu", copy=True)
            return out
        # Collective: every rank all-gathers; full tensors land on CPU on rank 0 (empty elsewhere).
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @contextlib.contextmanager
    def whole(self, tensor):
        yield tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def held_tensors(self):
        # A DTensor's own storage is not this rank's: its local shard (a view into FSDP's padded shard) is.
        return {term: [_local(t) for t in tensors] for term, tensors in super().held_tensors().items()}

    # Checkpoints: a parameter and its Adam moments are DTensors of one layout; each rank keeps its rows of a whole
    # value (DTensor's chunking is FSDP2's), so a checkpoint of any world size loads.

    def set_trained(self, p, value):
        with torch.no_grad():
            p.to_local().copy_(_local_part(value.to(p.dtype), p))

    def optimizer_state(self, p):
        local = self._plain.get(id(p))
        if local is not None:  # an 8-bit optimizer's state of this rank's rows: dequantized, then made whole
            state = eight_bit.dequantized(self.optimizer.state.get(local, {}))
            return {k: _whole(v, p) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()}
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.optimizer.state.get(p, {}).items()}

    def set_optimizer_state(self, p, state):
        device = p.to_local().device
        local = self._plain.get(id(p))
        if local is not None:  # this rank's rows, quantized into the optimizer's layout of them
            rows = {
                k: _local_part(v.to(device), p) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()
            }
            eight_bit.restore(self.optimizer, local, rows)
            return
        self.optimizer.state[p] = {
            k: _as_param(v.to(device), p) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in state.items()
        }


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _as_param(value: torch.Tensor, like: DTensor) -> DTensor:
    """A whole tensor laid out as `like`, this rank keeping its part (no communication: every rank holds it)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def _local_part(value: torch.Tensor, like: DTensor) -> torch.Tensor:
    return _as_param(value, like).to_local()


def _whole(local: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The whole tensor of which each rank holds the part `like` lays out (collective)."""
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


def _vocabulary_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The input and output embeddings, when they are separate modules with separate weights (tied ones share a
    parameter, which two FSDP units cannot)."""
    get_in = getattr(module, "get_input_embeddings", None)
    get_out = getattr(module, "get_output_embeddings", None)
    found = [m for m in (get_in() if get_in else None, get_out() if get_out else None) if m is not None]
    params = [{id(p) for p in m.parameters()} for m in found]
    if len(found) == 2 and (found[0] is found[1] or params[0] & params[1]):
        return []
    return found


def _load_shards(
    module: torch.nn.Module,
    weights: Weights,
    dtype_of: Callable[[torch.nn.Parameter], torch.dtype],
    device: torch.device,
) -> None:
    """Give each meta parameter (a DTensor since fully_shard) this rank's rows, read alone: no rank ever holds a
    whole parameter. FSDP then re-registers (and pads) its shards, as after `load_state_dict(assign=True)`."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    def make(name: str, p: torch.nn.Parameter) -> torch.nn.Parameter:
        assert isinstance(p, DTensor), f"{name} is not sharded"
        local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        rows = (offset[0], offset[0] + local_shape[0]) if len(local_shape) else None
        local = weights.tensor(name, tuple(p.shape), dtype_of(p), rows).to(device)
        sharded = DTensor.from_local(
            local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
        )
        return torch.nn.Parameter(sharded, requires_grad=p.requires_grad)

    replace_meta(module, make)
    for m in module.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    fsdp_param.reset_sharded_param()


def clip_sharded_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_norm over DTensor gradients: torch returns the global norm as a DTensor; make it a plain tensor (still
    on the device)."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).detach()


def plain_local_shards(
    groups: list[dict], into: dict[int, torch.nn.Parameter] | None = None
) -> tuple[list[dict], Callable[[torch.optim.Optimizer], None]]:
    """FSDP2 parameters are DTensors, which bitsandbytes' 8-bit kernels cannot take. Give such an optimizer plain
    parameters sharing each local shard's storage instead (an update to one is an update to the other), each recorded
    in `into` by its sharded parameter's id; the returned function, called with the built optimizer, hands it the
    local gradient shards each step."""
    pairs = []
    out = []
    for group in groups:
        params = []
        for p in group["params"]:
            if isinstance(p, DTensor):
                local = torch.nn.Parameter(p._local_tensor, requires_grad=True)
                pairs.append((p, local))
                if into is not None:
                    into[id(p)] = local
                params.append(local)
            else:
                params.append(p)
        out.append({**group, "params": params})
    return out, lambda opt: _hand_over_gradients(opt, pairs) if pairs else None


def _hand_over_gradients(opt: torch.optim.Optimizer, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Before each step the local parameters get the (already clipped) local gradient shards; after it both are
    cleared, since `zero_grad` only sees the optimizer's own parameters."""

    def before(*_):
        for sharded, local in pairs:
            local.grad = sharded.grad._local_tensor if sharded.grad is not None else None

    def after(*_):
        for sharded, local in pairs:
            sharded.grad = None
            local.grad = None

    opt.register_step_pre_hook(before)
    opt.register_step_post_hook(after)


def wrap(inputs: EngineInputs) -> Engine:
    return FsdpEngine(inputs)

"""PyTorch FSDP2: `fully_shard` on each transformer block, then the root; parameters are DTensors."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from launcher.config import Fsdp
from launcher.worker.strategies.base import Engine, EngineInputs, accumulate_and_step


class FsdpEngine(Engine):
    def __init__(self, inputs: EngineInputs):
        cfg = inputs.cfg
        assert isinstance(cfg.strategy, Fsdp)
        self.device = inputs.device
        self.module = inputs.model.to(self.device)
        mesh = init_device_mesh(self.device.type, (torch.distributed.get_world_size(),))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if cfg.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        blocks = [m for m in self.module.modules() if isinstance(m, inputs.block_types)]
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.strategy.reshard_after_forward)
        fully_shard(self.module, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.strategy.reshard_after_forward)
        self.optimizer, self.scheduler = inputs.make_optimizer(self.module)  # over the sharded parameters
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.max_grad_norm = cfg.train.max_grad_norm

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
        )

    def train(self, mode=True):
        self.module.train(mode)

    def gathered_state_dict(self, trainable_only):
        # Collective: every rank all-gathers; full tensors land on CPU on rank 0 (empty elsewhere).
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not trainable_only:
            return full
        wanted = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {n: t for n, t in full.items() if n in wanted}


def wrap(inputs: EngineInputs) -> Engine:
    return FsdpEngine(inputs)

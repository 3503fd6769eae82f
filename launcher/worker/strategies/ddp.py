"""PyTorch DDP: the whole model on every rank, gradients all-reduced in backward."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from launcher.choices import Ddp
from launcher.worker.strategies.base import (
    Engine,
    EngineInputs,
    accumulate_and_step,
    compute_dtype,
    local_state_dict,
)
from launcher.worker.weights import materialize


class DdpEngine(Engine):
    def __init__(self, inputs: EngineInputs):
        cfg = inputs.cfg
        assert isinstance(cfg.strategy, Ddp)
        self.device = inputs.device
        if inputs.weights is not None:  # DDP keeps a whole replica on every rank, by definition: all of it, fp32
            materialize(inputs.model, inputs.weights, self.device, lambda _: torch.float32)
        self.module = inputs.model.to(self.device)
        self.ddp = DistributedDataParallel(
            self.module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=cfg.strategy.find_unused_parameters,
            # Gradients are views into DDP's all-reduce buckets instead of copies of them: one gradient-sized
            # buffer per rank instead of two (the buckets exist either way).
            gradient_as_bucket_view=True,
        )
        self.optimizer, self.scheduler = inputs.make_optimizer(self.module)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.max_grad_norm = cfg.train.max_grad_norm
        self.dtype = compute_dtype(cfg.precision)
        # Every rank sees the same all-reduced gradients, so every rank's scaler takes the same decision.
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, batch):
        with self._autocast():
            return self.ddp(**batch)

    def train_step(self, micro_batches):
        return accumulate_and_step(
            micro_batches,
            forward=self.forward,
            set_sync=self._set_sync,  # only the last micro-batch all-reduces
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            params=self.params,
            max_grad_norm=self.max_grad_norm,
            scaler=self.scaler,
            before_step=self.hooks.before_step,
            micro_loss=self.hooks.micro_loss,
        )

    def _set_sync(self, sync: bool) -> None:
        self.ddp.require_backward_grad_sync = sync

    def train(self, mode=True):
        self.ddp.train(mode)

    def gathered_state_dict(self, trainable_only):
        return local_state_dict(self.module, trainable_only)


def wrap(inputs: EngineInputs) -> Engine:
    return DdpEngine(inputs)

"""DeepSpeed ZeRO stages 0-3 through `deepspeed.initialize`, with our optimizer and schedule as clients."""

from __future__ import annotations

import deepspeed
import torch

from launcher.config import Zero
from launcher.worker.strategies.base import Engine, EngineInputs, StepResult, current_lr, local_state_dict
from launcher.worker.strategies.zero_config import deepspeed_config


class ZeroEngine(Engine):
    def __init__(self, inputs: EngineInputs):
        cfg = inputs.cfg
        assert isinstance(cfg.strategy, Zero)
        self.device = inputs.device
        self.stage = cfg.strategy.stage
        self.module = inputs.model.to(self.device)
        optimizer, scheduler = inputs.make_optimizer(self.module)
        world = torch.distributed.get_world_size()
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, world, cuda=self.device.type == "cuda", hidden_size=_hidden_size(self.module)),
            dist_init_required=False,
        )
        self._lr_source = optimizer

    def forward(self, batch):
        return self.ds(**batch)

    def train_step(self, micro_batches):
        lr = current_lr(self._lr_source)
        losses = []
        for batch in micro_batches:
            loss = self.ds(**batch).loss
            self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            self.ds.step()  # a no-op until the accumulation boundary
            losses.append(loss.item())
        norm = self.ds.get_global_grad_norm()
        return StepResult(
            loss=sum(losses) / len(losses),
            grad_norm=None if norm is None else float(norm),
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
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return local_state_dict(self.module, trainable_only)

    def trainable_numel(self):
        # ZeRO-3 leaves an empty placeholder in each parameter; ds_numel is its whole size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters() if p.requires_grad)


def _hidden_size(module: torch.nn.Module) -> int | None:
    config = getattr(module, "config", None)
    return getattr(config, "hidden_size", None) if config is not None else None


def wrap(inputs: EngineInputs) -> Engine:
    return ZeroEngine(inputs)

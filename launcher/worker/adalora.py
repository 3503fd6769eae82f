"""AdaLoRA's rank budget while training: peft's `update_and_allocate` after every optimizer step, on any strategy
that holds the adapter's tensors whole (DDP, ZeRO 0-2; compat refuses ZeRO-3 and FSDP2).

peft scores each singular value by |value x gradient| of the step just taken and masks the least important ones in
place. Under DeepSpeed the gradients live in ZeRO's partitions and the values the optimizer steps are its fp32
masters, so the budget keeps each gradient whole between backward and the step (`Engine.trained_grad`), hands it
to peft as `.grad`, and writes every masked value back through the engine (`Engine.set_trained`)."""

from __future__ import annotations

import torch

from launcher.worker.hooks import StepHook
from launcher.worker.strategies.base import Engine


class RankBudget(StepHook):
    """Runs one model's AdaLoRA schedule: the gradients kept after the last backward, pruning after each step; a
    checkpoint keeps its scores."""

    key = "adalora"

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tuner = engine.module.base_model  # peft's AdaLoraModel
        self.name = self.tuner.trainable_adapter_name
        self.params = [(n, p) for n, p in engine.module.named_parameters() if "lora_" in n and p.requires_grad]
        self.grads: dict[str, torch.Tensor | None] = {}

    def before_step(self) -> None:
        """Between the last backward and the optimizer step (collective under ZeRO: every rank, the same order)."""
        self.grads = {n: self.engine.trained_grad(p) for n, p in self.params}

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (1-based): update the importance scores and mask to the step's budget."""
        values = [(n, p) for n, p in self.params if f"lora_E.{self.name}" in n]
        before = [p.detach().clone() for _, p in values]
        for n, p in self.params:
            g = self.grads.get(n)
            p.grad = None if g is None else g.detach().to(p.dtype).reshape(p.shape)
        try:
            self.tuner.update_and_allocate(step)
        finally:
            for _, p in self.params:
                p.grad = None
            self.grads = {}
        # peft masked the module's copy; the optimizer steps its own (ZeRO's fp32 masters): the values masked now are
        # zeroed there too. Every rank writes every value (the writes are collective under ZeRO), from the master
        # itself, so a bf16 module copy never rounds it.
        for (_, p), old in zip(values, before, strict=True):
            masked = (p.detach() == 0) & (old != 0)
            value = self.engine.trained_value(p)
            value[masked.to(value.device)] = 0
            self.engine.set_trained(p, value)

    def ranks(self) -> dict[str, int]:
        """Each target module's rank: its singular values left unmasked."""
        return {
            n.removesuffix(f".lora_E.{self.name}"): int((p.detach() != 0).sum())
            for n, p in self.params
            if f"lora_E.{self.name}" in n
        }

    def state(self) -> dict:
        """What a checkpoint keeps of the schedule, alike on every rank: the smoothed scores and the final pattern."""
        allocator, config = self.tuner.rankallocator, self.tuner.peft_config[self.name]

        def cpu(scores: dict) -> dict:
            return {n: t.detach().to("cpu", copy=True) for n, t in scores.items()}

        return {
            "exp_avg_ipt": cpu(allocator.exp_avg_ipt),
            "exp_avg_unc": cpu(allocator.exp_avg_unc),
            "rank_pattern": config.rank_pattern,
        }

    def restore(self, state: dict | None) -> None:
        """Put back `state` (a resumed run scores and prunes as the uninterrupted one would)."""
        if state is None:
            raise ValueError("the checkpoint holds no AdaLoRA budget state (written by another adapter?)")
        allocator, config = self.tuner.rankallocator, self.tuner.peft_config[self.name]
        devices = {n: p.device for n, p in self.engine.module.base_model.model.named_parameters()}
        for key in ("exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {n: t.to(devices.get(n, "cpu")) for n, t in state[key].items()})
        allocator.ipt = {n: torch.zeros_like(t) for n, t in allocator.exp_avg_ipt.items()}
        config.rank_pattern = state["rank_pattern"]

    def summary(self) -> dict:
        """summary.json's word: the ranks kept, against the budget and the start."""
        config = self.tuner.peft_config[self.name]
        ranks = self.ranks()
        kept = {
            "total_rank": sum(ranks.values()),
            "budget": config.target_r * len(ranks),
            "initial": config.init_r * len(ranks),
            "ranks": ranks,
        }
        return {"adalora": kept}


def attach(engine: Engine) -> RankBudget | None:
    """The budget of an AdaLoRA model, or None for any other adapter."""
    from peft.tuners.adalora import AdaLoraModel

    return RankBudget(engine) if isinstance(getattr(engine.module, "base_model", None), AdaLoraModel) else None

"""Writing the trained model: a peft adapter (LoRA) or a full HF model, always from gathered weights,
written to a temporary folder and renamed so a crash never leaves half a model."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file

from launcher.config import Lora, RunConfig
from launcher.task import Task
from launcher.worker import dist
from launcher.worker.strategies.base import Engine


def save_model(engine: Engine, cfg: RunConfig, task: Task, tokenizer, ranks: dist.Ranks) -> str:
    """Save into `output_dir/adapter` (LoRA) or `output_dir/model` (full). Collective: call on every rank."""
    is_lora = isinstance(cfg.adapter, Lora)
    state = engine.gathered_state_dict(trainable_only=is_lora)
    final = os.path.join(cfg.output_dir, "adapter" if is_lora else "model")
    if ranks.is_main:
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if is_lora:
            _check_adapter(tmp, engine.trainable_numel())
            if task.peft_task_type in ("SEQ_CLS", "TOKEN_CLS"):
                # The classifier's config (label names, id2label): an adapter alone would leave a merged model with
                # LABEL_0, LABEL_1... AutoConfig.from_pretrained(adapter) gives it back.
                engine.module.get_base_model().config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in task.files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    torch.distributed.barrier()
    return final


def _check_adapter(folder: str, expected: int) -> None:
    """Refuse an adapter whose saved tensors are not the trained ones (e.g. ZeRO-3 placeholders)."""
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    got = sum(t.numel() for t in saved.values())
    if got != expected:
        raise RuntimeError(f"saved adapter holds {got} values but {expected} were trained: refusing a broken adapter")

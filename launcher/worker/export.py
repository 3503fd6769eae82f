"""Writing the trained model: a peft adapter (LoRA, IA3, prompt, ...) or a full HF model, always from gathered weights,
written to a temporary folder and renamed so a crash never leaves half a model."""

from __future__ import annotations

import copy
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from launcher.choices import Full
from launcher.config import RunConfig
from launcher.files import ordinary_modes
from launcher.shards import write_shards
from launcher.task import Task
from launcher.worker import dist
from launcher.worker.strategies.base import Engine
from launcher.worker.watchdog import beating

# A full model's shard size: what rank 0 holds at most while it writes (transformers' own default is 5 GB).
EXPORT_SHARD_MB = 1000


def save_model(engine: Engine, cfg: RunConfig, task: Task, tokenizer, ranks: dist.Ranks) -> str:
    """Save into `output_dir/adapter` (any peft adapter) or `output_dir/model` (full). Collective: call on every rank.

    A full model is streamed: gathered one tensor at a time and written shard by shard (EXPORT_SHARD_MB), so no rank
    ever holds the whole model, only the shard being written."""
    is_lora = not isinstance(cfg.adapter, Full)
    final = os.path.join(cfg.output_dir, "adapter" if is_lora else "model")
    tmp = final + ".tmp"
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if is_lora:
        state = engine.gathered_state_dict(trainable_only=True)
        if ranks.is_main:
            write_adapter(engine.module, state, tmp, task, engine.trainable_numel())
    else:
        tensors = beating(engine.full_tensors(), "saving the model")
        if ranks.is_main:
            write_model(tensors, engine.module, tmp)
        else:
            for _ in tensors:  # the same collectives, in the same order, as rank 0's writes
                pass
    if ranks.is_main:
        shutil.rmtree(final, ignore_errors=True)
        publish(tmp, final, tokenizer, task)
    torch.distributed.barrier()
    return final


def write_adapter(module, state: dict[str, torch.Tensor], folder: str, task: Task, trained_numel: int) -> None:
    """A peft adapter (its trained tensors `state`, checked against `trained_numel`) and, for a classifier or a
    tagger, the model's config with its label names."""
    config = module.peft_config["default"]
    if config.is_prompt_learning:
        # peft would compute the prompt from the module (a forward of the prompt encoder on this rank alone: under
        # ZeRO-3 or FSDP2 a gather the other ranks never join); it is computed from the gathered tensors instead.
        saved = prompt_learning_tensors(config, state)
        save_file(saved, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(config)
        config.inference_mode = True
        config.save_pretrained(folder)
        trained_numel = (
            sum(t.numel() for t in saved.values()) if getattr(config, "prefix_projection", False) else (trained_numel)
        )
    else:
        if config.peft_type == "ADALORA":
            trained_numel -= _keep_unpruned(config, state)
        module.save_pretrained(folder, state_dict=state, safe_serialization=True)
    _check_adapter(folder, trained_numel)
    if task.peft_task_type in ("SEQ_CLS", "TOKEN_CLS"):
        # The classifier's config (label names, id2label): an adapter alone would leave a merged model with
        # LABEL_0, LABEL_1... AutoConfig.from_pretrained(adapter) gives it back.
        module.get_base_model().config.save_pretrained(folder)


def _keep_unpruned(config, state: dict[str, torch.Tensor]) -> int:
    """AdaLoRA's adapter keeps only the singular values left unmasked (peft saves and reloads by the config's
    rank_pattern): the pattern is read off the values saved, so it is the saved model's own (the best checkpoint's,
    say), and a value pruned to zero and dropped changes no output. Returns the elements dropped."""
    pattern, dropped = {}, 0
    for name, e in state.items():
        if ".lora_E." not in name:
            continue
        kept = (e.view(-1) != 0).tolist()
        pattern[name.removeprefix("base_model.model.")] = kept
        a, b = state[name.replace(".lora_E.", ".lora_A.")], state[name.replace(".lora_E.", ".lora_B.")]
        dropped += (len(kept) - sum(kept)) * (a.shape[1] + b.shape[0] + 1)
    config.rank_pattern = pattern
    return dropped


def prompt_learning_tensors(config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prompt or prefix adapter as peft saves it, from the trained tensors: `prompt_embeddings` (a prefix
    projection's MLP applied: what peft stores and reloads), and each trained head under its base model's name."""
    prefix = "prompt_encoder.default."
    encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    prompt = encoder["embedding.weight"]
    if getattr(config, "prefix_projection", False):  # PrefixEncoder.transform: Linear, Tanh, Linear
        hidden = torch.tanh(prompt @ encoder["transform.0.weight"].T + encoder["transform.0.bias"])
        prompt = hidden @ encoder["transform.2.weight"].T + encoder["transform.2.bias"]
    saved = {"prompt_embeddings": prompt.contiguous()}
    for name, value in state.items():
        if ".modules_to_save.default." in name:
            saved[name.replace(".modules_to_save.default.", ".")] = value
    return saved


def write_model(tensors, module: torch.nn.Module, folder: str, dtype: torch.dtype | None = None) -> None:
    """A whole model from (name, tensor) pairs, in safetensors shards with their index, and its configs (`dtype`:
    the tensors', when the module's own parameters are not)."""
    write_shards(folder, tensors, shard_mb=EXPORT_SHARD_MB)
    _save_configs(module, folder, dtype)


def publish(tmp: str, final: str, tokenizer, task: Task) -> None:
    """Add the tokenizer and the task's files (labels.json) to the folder `tmp`, then rename it `final`."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, content in task.files.items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(content, f, indent=2)
    ordinary_modes(tmp)
    os.replace(tmp, final)


def _save_configs(module: torch.nn.Module, folder: str, dtype: torch.dtype | None = None) -> None:
    """What `save_pretrained` writes beside the weights: the model's config and, for a generative model, its
    generation config."""
    module.config.architectures = [type(module).__name__]  # as save_pretrained records them: the class and the
    dtype = dtype or next((p.dtype for p in module.parameters() if p.is_floating_point()), None)  # weights' dtype
    if dtype is not None:
        module.config.dtype = dtype
    module.config.save_pretrained(folder)
    generation = getattr(module, "generation_config", None)
    if generation is not None and getattr(module, "can_generate", lambda: False)():
        generation.save_pretrained(folder)


def _check_adapter(folder: str, expected: int) -> None:
    """Refuse an adapter whose saved tensors are not the trained ones (e.g. ZeRO-3 placeholders)."""
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    got = sum(t.numel() for t in saved.values())
    if got != expected:
        raise RuntimeError(f"saved adapter holds {got} values but {expected} were trained: refusing a broken adapter")

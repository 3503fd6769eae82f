"""A model's parameters counted without its weights (where the planner starts): the model is built on the meta
device from its config.json alone (a shipped shape, `launcher/shapes/NAME.json`, or any local model folder), so a
70B shape costs no memory and answers in seconds. What each term costs in bytes is arithmetic on these counts:
the adapter's trainable parameters and a 4-bit base's storage (bitsandbytes' own layout) are computed here."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.choices.adapters import lora_tensors
from launcher.models import is_causal, load_shape, shipped_shapes

QUANT_BLOCK = 64
"""bitsandbytes' 4-bit block: one absmax per 64 weights."""
NESTED_BLOCK = 256
"""Double quantization: the absmaxes quantized to 8 bits in blocks of 256, one fp32 scale each."""


def planning_config(model: str) -> dict:
    """The config.json a `model=` value stands for, with no weights read: a shipped shape, `random:SHAPE` (its
    real model's vocabulary), or the folder of a local or packaged model."""
    from launcher.models import RANDOM, is_random, resolve_model

    if is_random(model):
        return load_shape(resolve_model(model)[len(RANDOM) :])  # resolve_model's error names the known shapes
    if model in shipped_shapes() or os.path.isdir(model):
        return load_shape(model)
    return load_shape(resolve_model(model))


@dataclass(frozen=True)
class Linear:
    name: str
    """Qualified module name."""
    in_features: int
    out_features: int
    bias: bool


@dataclass
class Counts:
    """A model's parameters, counted on the meta device (tied weights once)."""

    total: int
    linears: list[Linear] = field(default_factory=list)
    """Every nn.Linear, in module order."""
    skipped: set[str] = field(default_factory=set)
    """Module names all-linear leaves alone: the output embedding (lm_head) and task heads."""
    largest_block: int = 0
    """Parameters of the largest repeated block (a decoder layer): what ZeRO-3 and FSDP gather at once."""
    skipped_leaves: set[str] = field(default_factory=set)
    """Leaf names of every module inside the skipped ones."""
    params: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    """Every parameter's name and shape, in module order (a tied one once, under its first name)."""
    buffer_bytes: int = 0
    """The module's buffers as a rank holds them (fp32: rotary frequencies and the like)."""
    hidden_size: int = 0
    """config.hidden_size (it sizes DeepSpeed's buckets and ZeRO-3's persistence threshold)."""
    model_type: str = ""
    """config.model_type (peft picks IA3's default targets by it)."""
    num_layers: int = 0
    """config.num_hidden_layers (prefix tuning trains keys and values for each)."""
    kv_size: int = 0
    """Key (and value) width of an attention layer: head dim x key/value heads (prefix tuning's token width)."""

    def targets(self, target_modules: list[str]) -> list[Linear]:
        """The linear layers an adapter with `target_modules` (leaf names, or all-linear) wraps, as peft does:
        every linear whose leaf name is targeted. all-linear names the leaves of every linear outside the output
        embedding and the heads, less any leaf name found inside them (worker.adapters.linear_names)."""

        def leaf(name: str) -> str:
            return name.rsplit(".", 1)[-1]

        if target_modules == ["all-linear"]:
            names = {leaf(lin.name) for lin in self.linears if not within(lin.name, self.skipped)} - self.skipped_leaves
        else:
            names = set(target_modules)
        return [lin for lin in self.linears if leaf(lin.name) in names]

    def ia3_targets(self, target_modules: list[str], feedforward: list[str]) -> list[tuple[Linear, bool]]:
        """(linear, is feed-forward) of each layer IA3 rescales, as peft matches them: a module whose name is a
        target or ends with "." + a target; auto: peft's targets for the model type."""
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        )
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
        )

        targets = TARGETS.get(self.model_type, []) if target_modules == ["auto"] else target_modules
        ff = FEEDFORWARD.get(self.model_type, []) if feedforward == ["auto"] else feedforward

        def matches(name: str, names: list[str]) -> bool:
            return any(name == t or name.endswith("." + t) for t in names)

        return [(lin, matches(lin.name, ff)) for lin in self.linears if matches(lin.name, targets)]

    def lora_parameters(
        self, r: int, target_modules: list[str], dora: bool = False, where: Callable[[str], object] = bool
    ) -> int:
        """LoRA's trainable parameters (`lora_tensors` of every target whose name `where` accepts)."""
        targets = [t for t in self.targets(target_modules) if where(t.name)]
        return sum(
            math.prod(shape) for t in targets for shape in lora_tensors(t.in_features, t.out_features, r, dora).values()
        )


def within(name: str, modules: set[str]) -> bool:
    """Whether module `name` is one of `modules` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def kept_whole(model, heads) -> set[str]:
    """Module names no adapter changes: the task heads (by leaf name) and the output embedding (lm_head)."""
    skip = {name for name, _ in model.named_modules() if name and name.rsplit(".", 1)[-1] in heads}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return skip | {name for name, m in model.named_modules() if out is not None and m is out}


def model_class(config: dict):
    """(transformers Auto class, its config) for a config.json dict: a causal LM when its architectures say so, else
    the bare encoder (AutoModel). What the plan counts and what `launcher plan --verify` builds."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = dict(config)
    model_type = config.pop("model_type")
    return (AutoModelForCausalLM if is_causal(config) else AutoModel), AutoConfig.for_model(model_type, **config)


def count(config: dict, heads: tuple[str, ...] = ()) -> Counts:
    """Build the model of `config` on the meta device and count it: a causal LM when its architectures say so,
    else the bare encoder (AutoModel). `heads`: module leaf names that are task heads (left out of all-linear)."""
    import torch

    auto, cfg = model_class(config)
    with torch.device("meta"):
        model = auto.from_config(cfg)
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # a tied tensor once
    total = sum(math.prod(shape) for _, shape in params)
    buffer_bytes = sum(b.numel() * 4 for b in model.buffers())
    linears = [
        Linear(name, m.in_features, m.out_features, m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    skipped = kept_whole(model, heads)
    inner = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if within(n, skipped)}
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    largest = max((sum(p.numel() for p in b.parameters()) for layers in blocks for b in layers), default=0)
    return Counts(
        total=total,
        linears=linears,
        skipped=skipped,
        largest_block=largest,
        skipped_leaves=inner,
        params=params,
        buffer_bytes=buffer_bytes,
        hidden_size=getattr(cfg, "hidden_size", 0) or 0,
        model_type=getattr(cfg, "model_type", "") or "",
        num_layers=getattr(cfg, "num_hidden_layers", 0) or 0,
        kv_size=_kv_size(cfg),
    )


def _kv_size(cfg) -> int:
    hidden, heads = getattr(cfg, "hidden_size", 0) or 0, getattr(cfg, "num_attention_heads", 0) or 0
    if not heads:
        return hidden
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return head_dim * (getattr(cfg, "num_key_value_heads", None) or heads)


COUNTS_VERSION = 3
"""Bumped whenever Counts or the counting changes: older cached counts are then ignored."""


def counts_cache_path(config: dict, heads: tuple[str, ...]) -> str:
    import hashlib
    from importlib import metadata

    key = json.dumps([COUNTS_VERSION, metadata.version("transformers"), config, sorted(heads)], sort_keys=True)
    root = os.environ.get("LAUNCHER_CACHE") or os.path.expanduser("~/.cache/launcher")
    return os.path.join(root, "counts", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def cached_count(config: dict, heads: tuple[str, ...] = ()) -> Counts:
    """count(), remembered per config (in $LAUNCHER_CACHE/counts or ~/.cache/launcher/counts): building even on
    meta needs torch and transformers' model code (about 3 s to import), the counts themselves are a few kB."""
    from launcher.files import write_atomic

    path = counts_cache_path(config, heads)
    try:
        with open(path) as f:
            data = json.load(f)
        return Counts(
            total=data["total"],
            linears=[Linear(*lin) for lin in data["linears"]],
            skipped=set(data["skipped"]),
            largest_block=data["largest_block"],
            skipped_leaves=set(data["skipped_leaves"]),
            params=[(n, tuple(shape)) for n, shape in data["params"]],
            buffer_bytes=data["buffer_bytes"],
            hidden_size=data["hidden_size"],
            model_type=data["model_type"],
            num_layers=data["num_layers"],
            kv_size=data["kv_size"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not counted yet, or by another version: count again
    counts = count(config, heads)
    data = {
        "total": counts.total,
        "linears": [[lin.name, lin.in_features, lin.out_features, lin.bias] for lin in counts.linears],
        "skipped": sorted(counts.skipped),
        "largest_block": counts.largest_block,
        "skipped_leaves": sorted(counts.skipped_leaves),
        "params": counts.params,
        "buffer_bytes": counts.buffer_bytes,
        "hidden_size": counts.hidden_size,
        "model_type": counts.model_type,
        "num_layers": counts.num_layers,
        "kv_size": counts.kv_size,
    }
    try:
        write_atomic(path, json.dumps(data))
    except OSError:
        pass  # a read-only home: the next plan counts again
    return counts


def four_bit_constants(numel: int, double_quant: bool = True) -> int:
    """The quantization state bitsandbytes keeps beside one weight of `numel` elements packed to 4 bits (nf4 or fp4;
    every rank holds it whole): one absmax per block of 64 (fp32; with double quantization uint8, plus an fp32 scale
    per 256 absmaxes, the 256-entry code of that second quantization and its fp32 offset), and the 16-entry 4-bit
    code. The packed weights themselves are half a byte per element (sizing.stored_bytes)."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    if double_quant:
        absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4
    else:
        absmax = 4 * blocks
    return absmax + 4 * 16

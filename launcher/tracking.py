"""Which experiment trackers a run reports to, checked before launch (pure: no tracker is imported here)."""

from __future__ import annotations

import importlib.util
import os

TRACKERS = {"wandb": "wandb", "mlflow": "mlflow"}
"""tracking.report_to names and the package each needs."""


def chosen(report_to: str) -> list[str]:
    return [name.strip() for name in report_to.split(",") if name.strip()]


def problems(report_to: str, environ=os.environ) -> list[str]:
    """Unknown tracker names, trackers whose package is not installed here, and W&B without a way to log in (its
    login prompt would wait on a rank that has no terminal)."""
    out = []
    for name in chosen(report_to):
        if name == "tensorboard":
            continue  # always written
        if name not in TRACKERS:
            out.append(f"tracking.report_to={report_to}: no tracker named {name}; choose wandb, mlflow or both")
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            out.append(
                f"tracking.report_to={report_to}: the {TRACKERS[name]} package is not installed; "
                f"pip install 'launcher[tracking]' (or pip install {TRACKERS[name]})"
            )
        elif name == "wandb" and not _wandb_can_log_in(environ):
            out.append(
                f"tracking.report_to={report_to}: W&B has no credentials here: set WANDB_API_KEY, run `wandb login`, "
                "or set WANDB_MODE=offline (sync later with `wandb sync`)"
            )
    return out


def _wandb_can_log_in(environ) -> bool:
    if environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def flat(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested configuration as dotted keys (the trackers' parameters)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

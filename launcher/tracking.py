"""Which experiment trackers a run reports to, checked before launch (pure: no tracker is imported here)."""

from __future__ import annotations

import importlib.util
import os

TRACKERS = {"wandb": "wandb", "mlflow": "mlflow"}
"""tracking.report_to names and the package each needs."""
MASKED = "***"


def split_password(uri: str) -> tuple[str, str, str]:
    """(`uri` with the password of its user:password@ masked, the user, the password); a URI without one comes back
    as it is, with empty user and password."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None or parts.password == MASKED:
        return uri, "", ""
    host = parts.netloc.rsplit("@", 1)[1]
    masked = urlunsplit(parts._replace(netloc=f"{parts.username}:{MASKED}@{host}"))
    return masked, unquote(parts.username or ""), unquote(parts.password)


def credentials_env(uri: str) -> dict[str, str]:
    """The variables MLflow reads its credentials from, for a tracking URI holding a password (the ranks get them
    this way: the plan they read holds the URI with its password masked)."""
    _, user, password = split_password(uri)
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password} if password else {}


def plain_uri(uri: str) -> str:
    """A tracking URI as a rank uses it: one whose password was masked loses its user:password@ (MLflow takes the
    credentials from MLFLOW_TRACKING_USERNAME and _PASSWORD)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password != MASKED:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def masked_settings(settings: dict) -> dict:
    """`to_dict` of a run's configuration with the tracking URI's password masked: what is written or shown."""
    tracking = settings.get("tracking")
    if not isinstance(tracking, dict) or not isinstance(tracking.get("mlflow_uri"), str):
        return settings
    return {**settings, "tracking": {**tracking, "mlflow_uri": split_password(tracking["mlflow_uri"])[0]}}


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

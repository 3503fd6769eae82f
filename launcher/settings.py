"""What each setting affects, stated once. Three decisions are derived from these tags and from nothing else: the
tokenized-data cache's key (the settings that may shape tokenized rows, launcher.data.tokenize), the settings a
resumed run must keep (those that change what training computes, launcher.checkpoints), and the notes for settings
given but never read (`ignored`, with the choices' own rules: launcher.choices).

A setting is tagged by its dotted path or by a section it is in (`train` tags every `train.*` the longer paths do
not); a recipe tags its own settings in its Config's `affects` (a recipe's setting left untagged may shape its rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Affects:
    """What changing a setting changes."""

    rows: bool
    """The tokenized rows: the setting is part of the tokenization cache's key."""
    training: bool
    """What training computes: a resumed run must keep the checkpoint's value."""


ROWS = Affects(rows=True, training=True)
EVAL_ROWS = Affects(rows=True, training=False)
"""The evaluation split's rows: a resumed run may evaluate on other ones."""
TRAINING = Affects(rows=False, training=True)
OBSERVATION = Affects(rows=False, training=False)
"""Where and how often a run reports, saves and is watched, or how it computes the same values."""

COMMON: dict[str, Affects] = {
    "model": ROWS,
    "strategy": TRAINING,
    "adapter": TRAINING,
    "optimizer": TRAINING,
    "precision": TRAINING,
    "activation_checkpointing": TRAINING,
    "compile": TRAINING,
    "host_memory": OBSERVATION,
    "train": TRAINING,
    "train.eval_every": OBSERVATION,
    "train.eval_at_start": OBSERVATION,
    "train.log_every": OBSERVATION,
    "train.early_stop_patience": OBSERVATION,
    "train.metric_for_best": OBSERVATION,
    "train.best_is": OBSERVATION,
    "data": ROWS,
    "data.eval": EVAL_ROWS,
    "data.max_eval_rows": EVAL_ROWS,
    "data.group_by_length": TRAINING,
    "data.cache": OBSERVATION,
    "data.cache_dir": OBSERVATION,
    "data.num_workers": OBSERVATION,
    "checkpoint": OBSERVATION,
    "watchdog": OBSERVATION,
    "tracking": OBSERVATION,
    "resume": OBSERVATION,
    "seed": TRAINING,
    "output_dir": OBSERVATION,
    "overwrite": OBSERVATION,
}
"""The settings every recipe has (RunConfig's)."""


def affects(path: str, config_class: type) -> Affects:
    """What the setting at dotted `path` of a `config_class` (a recipe's Config) affects: its own tag or its
    innermost tagged section's, the recipe's tags (`config_class.affects`) before the common ones."""
    tags = {**COMMON, **getattr(config_class, "affects", {})}
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        tag = tags.get(".".join(parts[:end]))
        if tag is not None:
            return tag
    return ROWS  # a recipe's own setting, untagged: it may shape the rows


def rows_settings(settings: dict[str, Any], config_class: type, prefix: str = "") -> dict[str, Any]:
    """Of `settings` (a configuration as `overrides.to_dict` gives it, nested), those that may shape tokenized rows,
    nested as given."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        path = prefix + key
        if isinstance(value, dict):
            inner = rows_settings(value, config_class, path + ".")
            if inner:
                out[key] = inner
        elif affects(path, config_class).rows:
            out[key] = value
    return out


def training_settings(flat: dict[str, Any], config_class: type) -> dict[str, Any]:
    """Of `flat` (dotted path -> value), those that change what training computes."""
    return {path: value for path, value in flat.items() if affects(path, config_class).training}


def ignored(cfg: Any, given: set[str]) -> list[str]:
    """Settings the user gave (`given`: dotted keys) that this configuration never reads, each with the reason."""
    t, d = cfg.train, cfg.data
    rules = [
        ("train.epochs", t.max_steps > 0, f"train.max_steps={t.max_steps} sets the length of the run"),
        ("train.eval_every", not d.eval, "there is no eval set (data.eval is empty)"),
        ("train.eval_at_start", not d.eval, "there is no eval set (data.eval is empty)"),
        ("data.max_eval_rows", not d.eval, "there is no eval set (data.eval is empty)"),
        ("data.cache_dir", not d.cache, "data.cache=false: nothing is cached"),
        ("train.adv_epsilon", t.adversarial == "none", "train.adversarial=none"),
        ("train.adv_alpha", t.adversarial != "pgd", f"train.adversarial={t.adversarial}: only pgd takes alpha steps"),
        ("train.adv_steps", t.adversarial != "pgd", f"train.adversarial={t.adversarial}: only pgd takes steps"),
        (
            "train.metric_for_best",
            not (t.early_stop_patience or cfg.checkpoint.keep_best),
            "neither train.early_stop_patience nor checkpoint.keep_best follows a metric",
        ),
        ("overwrite", "output_dir" not in given, "a default run directory is always a new one"),
    ]
    rules += cfg.strategy.ignored()  # a choice knows which of its settings its others make unread
    out = []
    for key, unread, reason in rules:
        if key in given and unread:
            out.append(f"{key}={_value(cfg, key)} is ignored: {reason}")
    return out


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg

"""Following one eval metric through a run: the best evaluation so far, and whether training should stop early
(train.early_stop_patience) or end with the best evaluated model (checkpoint.keep_best). Pure: no torch import.

Every rank computes the same metrics over the whole eval set, so every rank's Selection decides alike and stops
at the same step with no collective of its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from launcher.errors import ConfigError

LOWER_IS_BETTER = ("loss", "perplexity", "error", "wer", "cer")


def higher_is_better(metric: str, best_is: str) -> bool:
    """best_is=higher|lower as given; auto: lower for losses, perplexities and error rates, higher otherwise."""
    if best_is != "auto":
        return best_is == "higher"
    return not any(word in metric.lower() for word in LOWER_IS_BETTER)


def wanted(cfg) -> bool:
    """Whether the run follows a metric at all."""
    return cfg.train.early_stop_patience > 0 or cfg.checkpoint.keep_best


def problems(cfg) -> list[str]:
    """What keeps early stopping or keep_best from working with these settings (before any process starts)."""
    t, out = cfg.train, []
    if t.early_stop_patience < 0:
        out.append(f"train.early_stop_patience={t.early_stop_patience}: use 0 to never stop early, or a count")
    if not wanted(cfg):
        return out
    asked = "train.early_stop_patience" if t.early_stop_patience > 0 else "checkpoint.keep_best"
    if not cfg.data.eval:
        out.append(f"{asked} follows an eval metric, but there is no eval set: set data.eval=FILE")
    elif t.eval_every < 1:
        out.append(f"{asked} compares evaluations during training: set train.eval_every=N (steps between them)")
    if not t.metric_for_best:
        out.append(f"{asked}: this recipe names no main metric; set train.metric_for_best to one of its eval metrics")
    return out


@dataclass
class Selection:
    """The best evaluation so far of one metric, and evaluations since it."""

    metric: str
    """The metric followed (train.metric_for_best)."""
    higher: bool
    """Whether a higher value is better."""
    patience: int = 0
    """Evaluations in a row without improvement that stop training; 0 never stops."""
    best_step: int | None = None
    best_value: float | None = None
    since_best: int = 0
    """Evaluations after the best one (none of them better)."""

    @classmethod
    def of(cls, cfg) -> Selection | None:
        if not wanted(cfg):
            return None
        t = cfg.train
        return cls(t.metric_for_best, higher_is_better(t.metric_for_best, t.best_is), t.early_stop_patience)

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Count the evaluation at `step`; True when it is the best so far (strictly better: a tie keeps the
        earlier). A nan is never better."""
        if self.metric not in metrics:
            raise ConfigError(
                f"train.metric_for_best={self.metric}: the recipe's evaluation gives "
                f"{', '.join(sorted(metrics))}; set train.metric_for_best to one of them"
            )
        value = float(metrics[self.metric])
        better = math.isfinite(value) and (
            self.best_value is None or (value > self.best_value if self.higher else value < self.best_value)
        )
        if better:
            self.best_step, self.best_value, self.since_best = step, value, 0
        else:
            self.since_best += 1
        return better

    @property
    def stop(self) -> bool:
        """Whether training should stop: `patience` evaluations in a row without a better one."""
        return self.patience > 0 and self.best_step is not None and self.since_best >= self.patience

    def why_stopped(self, step: int) -> str:
        return (
            f"early stop at step {step}: {self.metric} has not improved for {self.since_best} evaluation(s) since "
            f"step {self.best_step} ({self.best_value:.4g}; train.early_stop_patience={self.patience})"
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint records, so a resumed run goes on counting from here."""
        return asdict(self)

    def restore(self, state: dict[str, Any] | None) -> bool:
        """Take a checkpoint's state back when it followed the same metric the same way; True when it did."""
        if not state or state.get("metric") != self.metric or state.get("higher") != self.higher:
            return False
        self.best_step, self.best_value, self.since_best = state["best_step"], state["best_value"], state["since_best"]
        return True

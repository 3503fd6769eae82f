"""Metrics over gathered predictions (all ranks' examples, each exactly once)."""

from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, label: torch.Tensor) -> float:
    return (pred == label).float().mean().item() if len(label) else 0.0


def macro_f1(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    scores = []
    for c in range(num_classes):
        tp = ((pred == c) & (label == c)).sum().item()
        fp = ((pred == c) & (label != c)).sum().item()
        fn = ((pred != c) & (label == c)).sum().item()
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0

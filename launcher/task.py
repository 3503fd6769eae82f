"""What a recipe's `build_task` returns: everything the generic loop needs about one task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    train: Any
    """Map-style training dataset: `train[i]` is one example (a dict)."""
    eval: Any | None
    """Map-style evaluation dataset, or None."""
    collate: Callable[[list[dict]], dict]
    """Turns a list of examples into a batch of tensors the model takes as keyword arguments."""
    peft_task_type: str
    """peft's task type (SEQ_CLS, TOKEN_CLS, CAUSAL_LM)."""
    heads: list[str] = field(default_factory=list)
    """Module names trained in full even under LoRA (task heads)."""
    files: dict[str, Any] = field(default_factory=dict)
    """Extra JSON files saved beside the model (e.g. labels.json), name -> content."""
    info: dict[str, Any] = field(default_factory=dict)
    """Task facts the recipe's other functions need (e.g. the label names)."""
    lengths: list[int] | None = None
    """Token count of each training example; given, batches group examples of similar length."""
    notes: list[str] = field(default_factory=list)
    """Extra lines for the run log (the data layer notes skipped rows and cache reuse itself: launcher.data.note)."""
    count_tokens: Callable[[dict], int] | None = None
    """Real (non-padding) tokens in a batch, for tokens/s; default: the attention mask's sum."""

"""What a rank holds of its model state, measured: the bytes of the storages behind its parameters, master weights,
gradients and optimizer states, each storage counted once.

Each strategy names its tensors (`Engine.held_tensors`); this module only counts them. A storage is counted under
the first term that reaches it, in the order of TERMS: a ZeRO-1 parameter is a view into its flat buffer (the buffer
is counted once, padding included), and DeepSpeed steps an fp32 run's ZeRO-3 partitions in place, so its "master
weights" are the parameters' own storage and add nothing. Read between the last backward of a step and its optimizer
step (a step hook's `before_step`: worker.hooks): the gradients are reduced and held, and from the second step on the
optimizer states exist, the most a rank's model state holds outside the step's own temporaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from launcher.planning.sizing import TERMS, StateBytes
from launcher.worker.hooks import StepHook


def measure(sources: dict[str, Iterable[torch.Tensor]]) -> StateBytes:
    """Sum the storages of `sources` (term -> tensors), each storage once, under the first term in TERMS that names it,
    as the planner's StateBytes ("gpu" for a CUDA storage, else "cpu"). Meta tensors and empty placeholders count
    nothing."""
    held = StateBytes()
    seen: set[tuple[str, int]] = set()
    for term in TERMS:
        for t in sources.get(term, ()):
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (str(storage.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            held.add(term, storage.nbytes(), "gpu" if storage.device.type == "cuda" else "cpu")
    return held


def quantization_constants(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The tensors of every bitsandbytes quantization state: a 4-bit weight's absmax per block and code, with
    double quantization the absmax's own 8-bit state (its absmax, code and offset); an 8-bit weight's scale per row.
    A 4-bit state hangs on the weight, or on its layer once a sharding strategy replaced the weight."""
    for owner in [*module.parameters(), *module.modules()]:
        state = getattr(owner, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if torch.is_tensor(value):
                    yield value
            state = getattr(state, "state2", None)
        for value in (getattr(owner, "SCB", None), getattr(getattr(owner, "state", None), "SCB", None)):
            if torch.is_tensor(value):
                yield value


def tensors_of(value) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) list, tuple or dict."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_of(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_of(v)


def optimizer_states(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The state tensors of an optimizer (not its per-parameter step counts, which are scalars)."""
    for state in optimizer.state.values():
        for v in tensors_of(state):
            if v.dim() > 0:
                yield v


class Recorder(StepHook):
    """Measures a rank's holdings between the last backward and the step, keeping the largest; summary.json says it
    for every rank (`model_state_bytes_per_rank`)."""

    def __init__(self, sources, steps: int | None = None):
        self.sources = sources
        """Called with no arguments: term -> tensors (an Engine's `held_tensors`)."""
        self.steps = steps
        """Measure only this many times (None: every time): a run measures its first steps, then costs nothing."""
        self.calls = 0
        self.largest: StateBytes | None = None

    def before_step(self) -> None:
        if self.steps is not None and self.calls >= self.steps:
            return
        self.calls += 1
        held = measure(self.sources())
        if self.largest is None or held.total() > self.largest.total():
            self.largest = held

    def summary(self) -> dict:
        """Every rank's largest holdings, by term and place (collective: every rank calls it)."""
        from launcher.worker import dist

        return {"model_state_bytes_per_rank": dist.gather_objects(self.largest.bytes if self.largest else None)}

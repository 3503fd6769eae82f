"""What the run log should tell the user about the data (skipped rows, cache reuse, repaired tags), collected
where it happens so recipes need not pass notes along; the worker takes them once the task is built."""

from __future__ import annotations

_NOTES: list[str] = []


def note(text: str) -> None:
    """Record a line for the run log's start table (each distinct line once)."""
    if text not in _NOTES:
        _NOTES.append(text)


def take_notes() -> list[str]:
    """Every line recorded so far, in order; the collector is emptied."""
    out = list(_NOTES)
    _NOTES.clear()
    return out

"""Where the launcher's tables and lines go: a terminal gets rich at the terminal's width; anything else (a pipe, a
file, a rank's log) gets one record per line, never wrapped and with no padding at the ends of lines (rich alone
would wrap at 80 columns and pad every line to the table's width)."""

from __future__ import annotations

import sys

from rich.console import Console

UNWRAPPED = 100_000
"""The width off a terminal: wide enough that no line of ours is ever wrapped."""


class _Lines(Console):
    """A console off a terminal: each print rendered at UNWRAPPED columns, then written with its lines' trailing
    spaces cut."""

    def print(self, *objects, **kwargs) -> None:  # noqa: A003 - rich's name
        kwargs.setdefault("soft_wrap", True)
        with self.capture() as captured:
            super().print(*objects, **kwargs)
        text = "\n".join(line.rstrip() for line in captured.get().split("\n"))
        stream = sys.stderr if self.stderr else sys.stdout
        stream.write(text)
        stream.flush()


def make_console(*, stderr: bool = False) -> Console:
    """A rich console for stdout (or stderr): the terminal's when there is one, else one record per line."""
    console = Console(stderr=stderr, highlight=False)
    if console.is_terminal:
        return console
    return _Lines(stderr=stderr, highlight=False, width=UNWRAPPED, color_system=None)

"""`[host:rank] ` before every line a rank writes, under DeepSpeed's multi-node runner: pdsh prefixes lines with the
host only, and DeepSpeed's per-node launcher passes its ranks' output through unmarked. `launcher run --runner
deepspeed` sends the hosts (HOSTS_VARIABLE, in node-rank order); DeepSpeed's launcher gives each rank its node's
rank (CROSS_RANK). Output that bypasses Python's sys.stdout/sys.stderr (C++ libraries) keeps pdsh's prefix alone."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from launcher.job import HOSTS_VARIABLE


class Prefixed:
    """A text stream writing `prefix` at the start of every line into `stream`."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self._stream, self._prefix, self._at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_start:
                out.append(self._prefix)
            out.append(piece)
            self._at_start = piece.endswith(("\n", "\r"))
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str):  # flush, fileno, encoding, isatty, ...: the stream's own
        return getattr(self._stream, name)


def prefix_lines(environ=os.environ) -> None:
    hosts = [h for h in environ.get(HOSTS_VARIABLE, "").split(",") if h]
    node = environ.get("CROSS_RANK")
    if not hosts or node is None or not node.isdigit() or int(node) >= len(hosts):
        return
    prefix = f"[{hosts[int(node)]}:{environ.get('RANK', '0')}] "
    sys.stdout = Prefixed(sys.stdout, prefix)  # type: ignore[assignment]
    sys.stderr = Prefixed(sys.stderr, prefix)  # type: ignore[assignment]

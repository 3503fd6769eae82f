"""Network facts of this machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on this machine right now (for the rendezvous of a local job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Small network helpers shared by the demo, the tests and the servers they start."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it). Another process may take it before the
    caller binds: fine for tests and the local demo, not for production."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

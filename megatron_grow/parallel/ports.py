"""A free local TCP port for a rendezvous (``MASTER_PORT``): for the local process groups of
``parallel.spawn`` and a ``parallel.init`` given ``WORLD_SIZE`` > 1 without a port."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port no process listens on now (the kernel's pick for port 0 on 127.0.0.1).

    Returns:
        The port number.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

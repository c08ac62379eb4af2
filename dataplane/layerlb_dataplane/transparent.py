"""Transparent proxying: upstream sockets that carry the client's own source address.

STUB to be completed (issue 3 item 9). The signatures are the contract the proxies rely on.
"""

from __future__ import annotations

import socket


def bound_socket(source_ip: str, family: socket.AddressFamily) -> socket.socket:
    """A non-blocking TCP socket with IP_TRANSPARENT, bound to (source_ip, 0), ready to connect."""
    raise NotImplementedError


def setup_routing(mark: int = 0x1, table: int = 100) -> None:
    """Policy routing so that backends' replies to client addresses are delivered to this process."""
    raise NotImplementedError

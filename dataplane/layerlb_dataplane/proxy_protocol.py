"""PROXY protocol v1 (text) and v2 (binary): encode for backends, parse from trusted clients. Sans-IO.

STUB to be completed (issue 3 item 8). The signatures are the contract the proxies rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from layerlb.api import ProxyProtocolVersion


class ProxyProtocolError(ValueError):
    """A malformed or unexpected PROXY header; the connection is closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """The original connection a PROXY header describes; `local` (v2 LOCAL / v1 UNKNOWN) carries none."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    transport: Literal["TCP", "UDP"] = "TCP"

    @property
    def local(self) -> bool:
        return self.source is None


def encode(
    version: ProxyProtocolVersion,
    source: tuple[str, int],
    destination: tuple[str, int],
    transport: Literal["TCP", "UDP"] = "TCP",
) -> bytes:
    """The header to send first on an upstream connection."""
    raise NotImplementedError


class HeaderParser:
    """Accumulates the first bytes of a client connection until a whole header (v1 or v2) is read."""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """(header, bytes after it) once complete; None while more bytes are needed; raise on junk."""
        raise NotImplementedError


def trusted(peer_ip: str, cidrs: Sequence[str]) -> bool:
    """Whether a peer may (and so must) send a PROXY header."""
    raise NotImplementedError

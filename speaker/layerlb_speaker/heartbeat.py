"""The heartbeats' UDP socket: sends this speaker's heartbeat to every peer, hands received ones over.

A heartbeat counts only when it comes from the address listed for the node it names, so a stray or
forged datagram cannot keep a dead node alive (nor is it authentication: the node network is trusted, as
it is for the kubelet's own traffic). One socket serves both families when a peer has an IPv6 address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping

from layerlb_speaker.membership import Heartbeat, Holding, Pressure, Unavailable

Message = Heartbeat | Unavailable | Pressure | Holding

log = logging.getLogger("layerlb.speaker")

DEFAULT_PORT = 7947


def _canonical(address: str) -> str:
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


class HeartbeatSocket:
    """UDP on `port` of every address of the node; `received(message)` runs for each valid heartbeat,
    `Unavailable`, `Pressure` or `Holding` message."""

    def __init__(
        self,
        port: int,
        loop: asyncio.AbstractEventLoop,
        received: Callable[[Message], None],
        ipv6: bool,
    ) -> None:
        self.loop = loop
        self.received = received
        self.peers: dict[str, str] = {}  # node → canonical address
        self._nodes_by_address: dict[str, str] = {}
        self.ipv6 = ipv6
        if ipv6:
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::" if ipv6 else "0.0.0.0", port))
        self.sock.setblocking(False)
        self.port = port
        loop.add_reader(self.sock.fileno(), self.drain)

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """The peers' node names → addresses; heartbeats go to these and are accepted from these only."""
        self.peers = {node: _canonical(address) for node, address in peers.items()}
        self._nodes_by_address = {address: node for node, address in self.peers.items()}

    def drain(self) -> None:
        """Reads every datagram waiting now (also called before liveness is judged, see `runtime`)."""
        for _ in range(4096):
            try:
                data, source = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError as error:
                log.debug("heartbeat socket: %s", error)
                return
            beat: Message | None = (
                Heartbeat.decode(data)
                or Unavailable.decode(data)
                or Pressure.decode(data)
                or Holding.decode(data)
            )
            if beat is None:
                continue
            if self._nodes_by_address.get(_canonical(source[0])) != beat.node:
                log.debug("heartbeat for %s from %s ignored: not that node's address", beat.node, source[0])
                continue
            self.received(beat)

    def send(self, beat: Message, me: str) -> None:
        """Sends `beat` to every peer but this node; unreachable peers are skipped (they are dead to us)."""
        data = beat.encode()
        for node, address in self.peers.items():
            if node == me:
                continue
            target = address
            if self.ipv6 and ":" not in address:
                target = f"::ffff:{address}"
            with contextlib.suppress(OSError):
                self.sock.sendto(data, (target, self.port))

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

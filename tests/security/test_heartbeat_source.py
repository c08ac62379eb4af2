"""A speaker heartbeat counts only from the address of the Node it names (docs/security.md, threat model):
a datagram from another address on the node network cannot keep a dead node alive. Real UDP sockets on
loopback addresses; no authentication is claimed beyond that (the node network is trusted)."""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Iterator

import pytest
from layerlb_speaker.heartbeat import HeartbeatSocket
from layerlb_speaker.membership import Heartbeat

NODE_ADDRESS, OTHER_ADDRESS = "127.0.0.21", "127.0.0.22"


@pytest.fixture
def listening() -> Iterator[tuple[HeartbeatSocket, list[object]]]:
    loop = asyncio.new_event_loop()
    received: list[object] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    heartbeats = HeartbeatSocket(port, loop, received.append, ipv6=False)
    heartbeats.set_peers({"n1": NODE_ADDRESS, "n2": OTHER_ADDRESS})
    yield heartbeats, received
    heartbeats.close()
    loop.close()


def send_from(address: str, port: int, beat: Heartbeat) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.bind((address, 0))
        sender.sendto(beat.encode(), ("127.0.0.1", port))


def test_a_heartbeat_from_another_nodes_address_is_ignored(
    listening: tuple[HeartbeatSocket, list[object]],
) -> None:
    heartbeats, received = listening
    forged, genuine = Heartbeat("n1", ready=True, fresh=True), Heartbeat("n2", ready=True, fresh=True)
    send_from(OTHER_ADDRESS, heartbeats.port, forged)  # n2's address claiming to be n1
    send_from(OTHER_ADDRESS, heartbeats.port, genuine)
    while genuine not in received:  # loopback keeps the order: the forged one is read first
        assert select.select([heartbeats.sock], [], [], 30)[0], "no datagram within 30 s"
        heartbeats.drain()
    assert received == [genuine]
    send_from(NODE_ADDRESS, heartbeats.port, forged)  # the same datagram from n1's own address counts
    assert select.select([heartbeats.sock], [], [], 30)[0]
    heartbeats.drain()
    assert received == [genuine, forged]

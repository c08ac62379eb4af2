"""A forwarding pod binds its VIP before the network delivers it (LAYERLB_FREEBIND=1, set by the operator for
pod-network pods) and serves as soon as the address arrives; without it, an absent address stays an error.

Run in a network namespace of its own, where the test may add the VIP to the loopback as the network would.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest
from layerlb_dataplane import runtime

from tests.dataplane.helpers_runtime import l4_plan
from tests.netns import Topology

VIP = "192.0.2.44"


def bind_then_receive(vip: str, freebind: bool) -> str:
    """In the namespace: bind the listener of an L4 Plan on `vip`, then put `vip` on lo and connect."""
    if freebind:
        os.environ[runtime.FREEBIND_ENV] = "1"
    p = l4_plan(vip, [("t", 8080, "TCP"), ("u", 5353, "UDP")], [9])
    try:
        listeners = [runtime.bind(p, listener) for listener in p.listeners]
    except runtime.BindError as error:
        return f"refused: {error}"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{vip}/32", "dev", "lo"], check=True)
    tcp, udp = listeners
    with socket.create_connection((vip, 8080), timeout=5):
        tcp.setblocking(True)
        accepted, _ = tcp.accept()
        accepted.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"ping", (vip, 5353))
        udp.setblocking(True)
        data, _ = udp.recvfrom(64)
    for sock in listeners:
        sock.close()
    return f"served {data.decode()}"


@pytest.fixture
def topology() -> Iterator[Topology]:
    with Topology("freebind") as topo:
        yield topo


def test_a_pod_binds_its_vip_before_it_arrives_and_serves_once_it_does(topology: Topology) -> None:
    pod = topology.namespace("pod")
    assert pod.call(bind_then_receive, VIP, True) == "served ping"


def test_without_freebind_an_absent_vip_is_refused_with_one_line(topology: Topology) -> None:
    pod = topology.namespace("pod")
    assert pod.call(bind_then_receive, VIP, False) == (
        f"refused: cannot listen on {VIP}:8080/TCP (test/l4 listener t): the address is not on this host"
    )

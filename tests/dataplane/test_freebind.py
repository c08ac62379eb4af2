"""A transparent proxy binds its VIP before it is local (LAYERLB_FREEBIND=1, set by the operator) and serves as
soon as the address arrives; without it, an absent address stays an error. A pod-network pod, which
kube-proxy sends the VIP's packets to (destination rewritten to the pod's address), listens on any address
(LAYERLB_BIND_ANY=1).

Run in a network namespace of its own, where the test may add the VIP to the loopback as the network would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from layerlb_dataplane.control import runtime

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


def bind_any_then_receive_on_the_pod_address(vip: str, pod_address: str) -> str:
    """In the namespace, as a pod-network pod behind kube-proxy: the listeners of a Plan for `vip` (never
    local here) bound with LAYERLB_BIND_ANY=1, then a connection and a datagram to the pod's own address,
    where kube-proxy's DNAT sends the VIP's packets."""
    os.environ[runtime.BIND_ANY_ENV] = "1"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{pod_address}/32", "dev", "lo"], check=True)
    p = l4_plan(vip, [("t", 8080, "TCP"), ("u", 5353, "UDP")], [9])
    tcp, udp = [runtime.bind(p, listener) for listener in p.listeners]
    with socket.create_connection((pod_address, 8080), timeout=5):
        tcp.setblocking(True)
        accepted, _ = tcp.accept()
        accepted.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"ping", (pod_address, 5353))
        udp.setblocking(True)
        data, _ = udp.recvfrom(64)
    names = [sock.getsockname()[0] for sock in (tcp, udp)]
    tcp.close()
    udp.close()
    return f"served {data.decode()} on {' '.join(names)}"


def test_a_pod_network_pod_behind_kube_proxy_listens_on_any_address(topology: Topology) -> None:
    pod = topology.namespace("pod")
    assert pod.call(bind_any_then_receive_on_the_pod_address, VIP, "10.244.1.7") == (
        "served ping on 0.0.0.0 0.0.0.0"
    )


def transparent_vip_on_loopback(example: str, vip: str) -> list[str]:
    """In the namespace: the transparent example's Plan applied (its VIP not yet local), then removed; the
    loopback's addresses after each step."""
    import asyncio
    import json

    from layerlb_dataplane.control import config

    from layerlb import plan as plan_model

    os.environ[runtime.FREEBIND_ENV] = "1"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    rendered = subprocess.run(
        [sys.executable, "-m", "layerlb.cli", "render", "--format", "dataplane", example],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    p = plan_model.Plan.model_validate(json.loads(rendered.stdout)).model_copy(update={"vip": vip})

    def loopback() -> str:
        return subprocess.run(
            ["ip", "-4", "-br", "addr", "show", "dev", "lo"], capture_output=True, text=True
        ).stdout

    async def steps() -> list[str]:
        dataplane = runtime.Dataplane(config.StaticSource([p]), signals=(), probe_health=False)
        seen = [loopback()]
        problem = await dataplane.apply([p], initial=True)
        seen.append(problem or loopback())
        await dataplane.apply([])
        seen.append(loopback())
        await dataplane.stop(1)
        return seen

    return asyncio.run(steps())


def test_the_transparent_proxy_puts_its_vip_on_the_nodes_loopback_and_takes_it_off_with_the_plan(
    topology: Topology,
) -> None:
    example = str(Path(__file__).resolve().parents[2] / "examples" / "l7-transparent.yaml")
    vip = "192.0.2.77"  # not local: a loopback-range address (the example's) would be already
    before, applied, removed = topology.namespace("node").call(transparent_vip_on_loopback, example, vip)
    assert vip not in before
    assert f"{vip}/32" in applied, applied
    assert vip not in removed, removed

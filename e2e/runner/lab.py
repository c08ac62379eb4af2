"""The runner's lab in the QEMU guest: its backends (every port the examples use, see `e2e/examples.py`),
its VIP range, and what its network needs for the kernel architectures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from e2e.examples import HTTP_PORTS, UDP_PORTS
from e2e.runner import network
from e2e.runner.network import Host, Lab
from examples import backends as backend_servers
from tests.netns import Spawned

VIP_RANGE: Final = "172.29.0.10-172.29.0.250"


def start_backends(lab: Lab, count: int = 3, group: str = "") -> list[tuple[Host, Spawned]]:
    """`count` backend namespaces answering as b1, b2, ..., each serving HTTP and UDP on the examples'
    ports; `group` tells apart the namespaces of several such sets."""
    started = []
    for index in range(1, count + 1):
        host = lab.backend(f"{group}b{index}")
        server = host.namespace.spawn(
            backend_servers.run, f"b{index}", list(HTTP_PORTS), list(UDP_PORTS), "0.0.0.0"
        )
        started.append((host, server))
    for _, server in started:
        server.wait_for_line("ready", timeout=30)
    return started


def route_replies_through(hosts: Sequence[Host], node: str | None) -> None:
    """Backends' route back to the clients' subnet: through `node` (NAT without masquerade, transparent
    proxying: replies must pass the LB that translated them), or the default router again (None)."""
    for host in hosts:
        if node is None:
            host.namespace.ip("route", "replace", str(network.CLIENTS), "via", network.ROUTER_LAN)
        else:
            host.namespace.ip("route", "replace", str(network.CLIENTS), "via", node)


def accept_vip_directly(hosts: Sequence[Host], vip: str) -> None:
    """Direct server return: each backend owns the VIP on its loopback, and never answers ARP for it."""
    for host in hosts:
        host.namespace.sysctl("net.ipv4.conf.all.arp_ignore", 1)
        host.namespace.sysctl("net.ipv4.conf.all.arp_announce", 2)
        if vip not in host.namespace.ip("-br", "addr", "show", "dev", "lo"):
            host.namespace.ip("addr", "add", f"{vip}/32", "dev", "lo")

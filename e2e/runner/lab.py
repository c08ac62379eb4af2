"""The examples, moved into the runner's lab: its backends, a VIPPool for it, and what the network needs.

`examples/*.yaml` point at local or documentation addresses; `adapt` keeps everything each example
declares (listeners, algorithms, routes, health checks, TLS) and changes only where it lives: its
namespace, its VIP (drawn from the lab's VIPPool instead) and its endpoints' addresses (each distinct
address:port of the example becomes one of the lab's backends, the port kept). Every lab backend serves
every port the examples use, so any endpoint mapping answers.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from e2e.runner import network
from e2e.runner.network import Host, Lab
from examples import backends as backend_servers
from tests.netns import Spawned

EXAMPLES: Final = Path(__file__).resolve().parents[2] / "examples"
HTTP_PORTS: Final = (80, 443, 5353, 5432, 8080, 8081, 9001, 9002, 9003)
UDP_PORTS: Final = (5353, 7777, 9001, 9002, 9003)
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


def vip_pool(name: str, namespaces: Sequence[str], addresses: str = VIP_RANGE) -> dict[str, Any]:
    """The lab's VIPPool: addresses the lab's router routes to whichever pods serve them."""
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": name},
        "spec": {"addresses": [addresses], "namespaces": list(namespaces), "autoAssign": True},
    }


def documents(file: str) -> list[dict[str, Any]]:
    """Every document of one example file."""
    return [d for d in yaml.safe_load_all((EXAMPLES / file).read_text()) if d]


def adapt(
    file: str, namespace: str, addresses: Sequence[str], name: str | None = None, **spec: Any
) -> list[dict[str, Any]]:
    """The example `file`'s documents moved into `namespace` and onto the lab's backends at `addresses`."""
    moved = []
    for original in documents(file):
        document = copy.deepcopy(original)
        document["metadata"]["namespace"] = namespace
        if document["kind"] == "LoadBalancer":
            if name:
                document["metadata"]["name"] = name
            document["spec"].pop("vip", None)
            mapping: dict[tuple[str, Any], str] = {}
            lab_backends = itertools.cycle(addresses)
            for backend in document["spec"].get("backends") or []:
                for endpoint in backend.get("endpoints") or []:
                    key = (endpoint["address"], endpoint.get("port"))
                    if key not in mapping:
                        mapping[key] = next(lab_backends)
                    endpoint["address"] = mapping[key]
            document["spec"].update(spec)
        moved.append(document)
    return moved


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

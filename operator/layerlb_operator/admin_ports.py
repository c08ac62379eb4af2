"""Admin ports of host-network forwarding pods, so that any number of kernel-architecture LoadBalancers
can share a node.

The forwarding pods of `nat`, `dsr` and `tunnel` run in the node's network namespace (they program its
IPVS or nftables), so their admin server (probes, metrics) binds a node port, and the scheduler places
no two pods with the same host port on one node. With one fixed port, a cluster of N nodes could run
only N such LoadBalancers (with one replica each); the next pods stayed Pending, or crash-looped where
the port was taken outside Kubernetes' view. So each host-network LoadBalancer gets its own port from
a range (`LAYERLB_HOST_ADMIN_PORTS`, default 9090-9289); pod-network LoadBalancers keep 9090 in their
own network namespace.

Rules: a LoadBalancer keeps the port its Deployment already has while no other holds it (so pods never
roll for nothing, and a restarted operator finds every port again in the Deployments it watches);
otherwise it takes the lowest free port. Two Deployments found on one port (an upgrade from the fixed
port) keep it for the first by name; the others move. Claims made by this process and not yet visible
in any Deployment are kept in a `vips.Ledger`, like VIPs. No port free: `NoAdminPortAvailable`, and the
LoadBalancer waits until one is released.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

ENV: Final = "LAYERLB_HOST_ADMIN_PORTS"
DEFAULT: Final = range(9090, 9290)
REASON: Final = "NoAdminPortAvailable"


def parse_range(text: str) -> range:
    """`9090-9289` -> range(9090, 9290); ValueError naming the variable and what is valid."""
    first, dash, last = text.strip().partition("-")
    try:
        low, high = int(first), int(last if dash else first)
    except ValueError:
        low, high = 0, -1
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"{ENV}={text!r}: want FIRST-LAST, two ports from 1024 to 65535, FIRST <= LAST")
    return range(low, high + 1)


def describe(ports: range) -> str:
    return f"{ports.start}-{ports.stop - 1}"


def choose(owner: str, holders: Mapping[str, str], ports: range) -> int | None:
    """The admin port for `owner` ("namespace/instance"), given who holds which port (port -> owner):
    its own while it has one in the range, else the lowest free one; None when every port is taken."""
    taken = set()
    for port, holder in holders.items():
        if holder == owner and int(port) in ports:
            return int(port)
        taken.add(int(port))
    return next((port for port in ports if port not in taken), None)


def port_of(deployment: Mapping[str, Any]) -> int | None:
    """The admin port a forwarding Deployment's pods bind on their node; None for pod-network ones."""
    spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    if not spec.get("hostNetwork"):
        return None
    for container in spec.get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "admin" and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None

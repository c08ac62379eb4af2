"""Who announces which VIP: a pure function from (VIPs with their eligible nodes, live speakers) to holders.

Every speaker evaluates the same function on the same inputs and so agrees on one holder per VIP without
talking to the others. The holder is chosen by rendezvous (highest-random-weight) hashing of (VIP, node
name) over the nodes that are both eligible for the VIP and alive: each node's weight for a VIP is fixed,
so a VIP moves only when its holder leaves (or stops being eligible), and then to the next-highest node;
VIPs held by other nodes stay put. A returning node takes back exactly the VIPs it ranks first for.

The weight is a wire contract between speakers: two versions that hash differently would both answer
during a rolling upgrade. `tests/speaker/test_announcement.py` pins it with a golden file.

Freshness (see `membership` and `runtime`): a speaker whose view of the Kubernetes API is stale still
heartbeats, and says so. For each VIP the candidates are the eligible live speakers with a fresh view;
only when none of them is fresh do stale ones count. So a speaker cut off from the API server never takes
a VIP from a peer that sees the current state, yet when the API server is down for everybody the
speakers keep announcing their last known state and still fail over between themselves.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Owner:
    """The Kubernetes object a VIP belongs to, for Events and logs ("LoadBalancer shop/web")."""

    kind: str
    namespace: str
    name: str
    uid: str = ""
    api_version: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Vip:
    """One address to announce, the nodes that can serve it, and where to announce it.

    `interfaces` empty means the speaker's default interfaces (the one holding the node's address).
    """

    address: Address
    eligible: frozenset[str]
    owners: tuple[Owner, ...] = ()
    interfaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Member:
    """A live speaker as the membership sees it: its node name and whether its API view is fresh."""

    node: str
    fresh: bool = True


def weight(address: Address, node: str) -> int:
    """The rendezvous weight of `node` for `address`: 64 bits of BLAKE2b over both, stable across versions."""
    digest = hashlib.blake2b(f"{address.compressed}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(address: Address, nodes: Iterable[str]) -> list[str]:
    """`nodes` from the first choice for `address` to the last (ties, practically impossible, by name)."""
    return sorted(nodes, key=lambda node: (weight(address, node), node), reverse=True)


def holder(vip: Vip, members: Mapping[str, Member]) -> str | None:
    """The node that announces `vip` given the live speakers, or None when no live speaker may serve it.

    Candidates are the eligible live speakers whose view is fresh; if none is, the eligible live ones.
    """
    live = [node for node in vip.eligible if node in members]
    fresh = [node for node in live if members[node].fresh]
    pool = fresh or live
    if not pool:
        return None
    return max(pool, key=lambda node: (weight(vip.address, node), node))


def announcements(vips: Iterable[Vip], members: Mapping[str, Member]) -> dict[Address, str]:
    """Every VIP that some live speaker announces → that speaker's node name (the whole desired state)."""
    chosen: dict[Address, str] = {}
    for vip in vips:
        node = holder(vip, members)
        if node is not None:
            chosen[vip.address] = node
    return chosen


def mine(vips: Iterable[Vip], members: Mapping[str, Member], me: str) -> dict[Address, Vip]:
    """The VIPs node `me` announces, by address."""
    return {vip.address: vip for vip in vips if holder(vip, members) == me}

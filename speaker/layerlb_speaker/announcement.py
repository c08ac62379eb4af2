"""Who announces which VIP: a pure function from (VIPs with their eligible nodes, live speakers) to holders.

Every speaker evaluates the same function on the same inputs and so agrees on one holder per VIP without
asking the others. A VIP stays with its **incumbent**, the live candidate that announces it now (each
speaker tells its peers which VIPs it holds, `membership.Holding`), for as long as the incumbent may hold it.
Only a VIP that no candidate holds is placed, by rendezvous (highest-random-weight) hashing of (VIP, node
name) over the nodes that are both eligible for the VIP and alive. So a VIP moves only when its holder
leaves, stops being eligible or loses the VIP's interfaces — never because another node became eligible or
came back: a second forwarding pod turning Ready elsewhere, a node joining, a speaker restarting move
nothing. That matters because a move cuts connections: the new holder's node has no state for the flows
that reached the old one (its kube-proxy or its forwarding pod answers them with a reset). VIPs held by
other nodes stay put when one leaves, and its VIPs go to the next-highest node each.
Should two candidates claim one VIP (both took it while they could not hear each other), the one ranking
first for it keeps it and the other lets go, on every speaker alike.
A VIP restricted to interfaces (its VIPPool's `spec.announce.interfaces`) is held only by a node that has
one of them: each speaker tells its peers which wanted interfaces it lacks (`membership`), so a node
missing them drops out of the candidates the same way everywhere, and the weights never change.

The weight is a wire contract between speakers: two versions that hash differently would both answer
during a rolling upgrade. `tests/speaker/test_announcement.py` pins it with a golden file. A speaker of the
version before incumbency tells no holdings: it is nobody's incumbent, and it places by weight alone.

Freshness (see `membership` and `runtime`): a speaker whose view of the Kubernetes API is stale still
heartbeats, and says so. For each VIP the candidates are the eligible live speakers with a fresh view;
only when none of them is fresh do stale ones count. So a speaker cut off from the API server never takes
a VIP from a peer that sees the current state, yet when the API server is down for everybody the
speakers keep announcing their last known state and still fail over between themselves.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection, Iterable, Mapping
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

    `interfaces` empty means the speaker's default interfaces (the one holding the node's address);
    otherwise only these, and a node that has none of them cannot serve the VIP. `pool` is the VIPPool the
    address belongs to (whose `spec.announce` gave `interfaces` and narrowed `eligible`), for Events.
    `l2` False (the pool's `spec.announce.l2: false`): BGP only, no node answers ARP/NDP for it.
    `routable`: the nodes that may advertise it over BGP where the pool's `spec.announce.nodeSelector`,
    which is L2's only, narrowed `eligible` (None: `eligible`).
    """

    address: Address
    eligible: frozenset[str]
    owners: tuple[Owner, ...] = ()
    interfaces: tuple[str, ...] = ()
    pool: Owner | None = None
    l2: bool = True
    routable: frozenset[str] | None = None

    @property
    def advertisers(self) -> frozenset[str]:
        """The nodes that may advertise the VIP over BGP: eligible, whatever the pool's L2 nodeSelector says."""
        return self.eligible if self.routable is None else self.routable


@dataclass(frozen=True)
class Member:
    """A live speaker as the membership sees it: its node name, whether its API view is fresh, the
    interfaces wanted by some VIP that it cannot answer on (missing or down on its node), and the VIPs it
    says it holds."""

    node: str
    fresh: bool = True
    unavailable: frozenset[str] = frozenset()
    holds: frozenset[Address] = frozenset()

    def serves(self, vip: Vip) -> bool:
        """Whether this speaker can answer for `vip`: it has (up) at least one of the VIP's interfaces."""
        return not vip.interfaces or any(name not in self.unavailable for name in vip.interfaces)


def weight(address: Address, node: str) -> int:
    """The rendezvous weight of `node` for `address`: 64 bits of BLAKE2b over both, stable across versions."""
    digest = hashlib.blake2b(f"{address.compressed}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(address: Address, nodes: Iterable[str]) -> list[str]:
    """`nodes` from the first choice for `address` to the last (ties, practically impossible, by name)."""
    return sorted(nodes, key=lambda node: (weight(address, node), node), reverse=True)


def candidates(vip: Vip, members: Mapping[str, Member]) -> list[str]:
    """The nodes that may hold `vip`: the eligible live speakers that have one of the VIP's interfaces and
    whose view is fresh; if none is fresh, the eligible live ones that have an interface."""
    live = [node for node in vip.eligible if node in members and members[node].serves(vip)]
    fresh = [node for node in live if members[node].fresh]
    return fresh or live


def first_by_weight(vip: Vip, members: Mapping[str, Member]) -> str | None:
    """The candidate ranking first for `vip`: where it goes when nobody holds it."""
    pool = candidates(vip, members)
    return max(pool, key=lambda node: (weight(vip.address, node), node)) if pool else None


def holder(vip: Vip, members: Mapping[str, Member], joining: Collection[str] = ()) -> str | None:
    """The node that announces `vip` given the live speakers, or None when no live speaker may serve it.

    A candidate that holds the VIP keeps it (the first by weight, should two hold it); else the first
    candidate by weight takes it — unless an eligible speaker still `joining` ranks above it: then nobody
    takes it until that one has joined (it takes it) or died.
    """
    pool = candidates(vip, members)
    incumbents = [node for node in pool if vip.address in members[node].holds]
    if incumbents:
        return max(incumbents, key=lambda node: (weight(vip.address, node), node))
    waiting = [node for node in joining if node in vip.eligible and node not in members]
    first = max([*pool, *waiting], key=lambda node: (weight(vip.address, node), node), default=None)
    return None if first in waiting else first


def announcements(
    vips: Iterable[Vip], members: Mapping[str, Member], joining: Collection[str] = ()
) -> dict[Address, str]:
    """Every VIP that some live speaker announces → that speaker's node name (the whole desired state)."""
    chosen: dict[Address, str] = {}
    for vip in vips:
        node = holder(vip, members, joining)
        if node is not None:
            chosen[vip.address] = node
    return chosen


def mine(vips: Iterable[Vip], members: Mapping[str, Member], me: str) -> dict[Address, Vip]:
    """The VIPs node `me` announces, by address."""
    return {vip.address: vip for vip in vips if holder(vip, members) == me}

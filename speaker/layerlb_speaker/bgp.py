"""What this node announces over BGP, and to whom: peers and advertisements in, per-session routes out (pure).

The inputs have the shape of the BGPPeer and BGPAdvertisement resources (`layerlb.api`), read here from a
static configuration's `bgp:` section (`parse`) and, in a cluster, from the resources:

    bgp:
      peers:
        - name: tor1
          peerAddress: 10.0.60.254
          peerASN: 64512
          localASN: 64513            # equal to peerASN: iBGP
          holdTime: 9                # seconds, 0 or 3-65535; keepaliveTime default holdTime / 3
          password: s3cret           # static mode only (tests, a lab); or passwordFile: /path
          sourceAddress: 10.0.60.11  # optional
          ebgpMultiHop: false
          bfd: {receiveInterval: 300, transmitInterval: 300, detectMultiplier: 3}   # absent: no BFD
          nodeSelector: {matchLabels: {rack: a}}
          routerID: 10.0.60.1        # optional; default: the node's IPv4 address
      advertisements:
        - name: default
          vipPools: [edge]           # absent or empty: every VIP
          peers: [tor1]              # absent or empty: every peer
          nodeSelector: {}           # nodes that advertise
          communities: ["65000:100", no-export]
          largeCommunities: ["65000:1:2"]
          localPreference: 200       # iBGP only
          aggregationLength: 32
          aggregationLengthV6: 128

`desired` decides, for one node: each peer whose nodeSelector matches opens a session carrying its
address family's routes (IPv4 to an IPv4 peer, IPv6 to an IPv6 one: a dual-stack cluster lists the router
twice). A VIP is routed to a peer when the node can serve it (as for L2: ready forwarding pods, a Service's
Ready nodes or local endpoints; but not the pool's `spec.announce.nodeSelector`, which is L2's only:
`Vip.advertisers`) and an advertisement selects its pool, the peer and the node. Every such node
announces, so the router spreads the VIP by ECMP; there is no holder and no heartbeat. Several
advertisements giving a peer the same prefix merge: the union of their communities, the highest local
preference.

Both sources go through the core's `validation.validate` (`problems_of`), so a static entry is refused with
the message the CLI and the API server give (`bgp.peers[0].peerASN: expected an integer, got 'x'`) and
skipped, as the rest of the static configuration is. A peer that validates but cannot be configured (its
password Secret unreadable, in Kubernetes) keeps its place with a `problem`: it opens no session, and the
problem is its node's `lastError` in the BGPPeer's status.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerlb import api
from layerlb_speaker.announcement import Address, Vip

WELL_KNOWN = {
    "no-export": (65535, 65281),
    "no-advertise": (65535, 65282),
    "local-as": (65535, 65283),
    "blackhole": (65535, 666),
}
# What BIRD reads between double quotes unchanged, within TCP-MD5's 80-byte key.
PASSWORD = re.compile(r"^[ !#-\[\]-~]{1,80}$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Bfd:
    """BFD timings in milliseconds, as the BGPPeer's `bfd`."""

    receive_ms: int = 300
    transmit_ms: int = 300
    multiplier: int = 3


@dataclass(frozen=True)
class Peer:
    """One router, as a BGPPeer's spec: where it is, both ends' AS numbers, timers and options."""

    name: str
    address: Address
    peer_asn: int
    local_asn: int
    port: int = 179
    hold: int = 90
    keepalive: int | None = None
    password: str | None = None
    source: Address | None = None
    multihop: bool = False
    bfd: Bfd | None = None
    selector: api.LabelSelector | None = None
    router_id: ipaddress.IPv4Address | None = None
    problem: str = ""  # why no session can be opened (a password Secret unreadable); empty: none

    @property
    def ibgp(self) -> bool:
        return self.peer_asn == self.local_asn

    @property
    def keepalive_time(self) -> int:
        return self.keepalive if self.keepalive is not None else self.hold // 3


@dataclass(frozen=True)
class Advertisement:
    """Which VIPs go to which peers from which nodes, with which attributes, as a BGPAdvertisement's spec."""

    name: str
    pools: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    selector: api.LabelSelector | None = None
    communities: tuple[tuple[int, int], ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    local_preference: int | None = None
    length: int = 32
    length_v6: int = 128


@dataclass(frozen=True)
class Intent:
    """The BGP part of the inventory: peers, advertisements, and every node's labels (for the selectors)."""

    peers: tuple[Peer, ...] = ()
    advertisements: tuple[Advertisement, ...] = ()
    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Attributes:
    """What a route carries to one peer: communities, large communities, LOCAL_PREF (iBGP only)."""

    communities: frozenset[tuple[int, int]] = frozenset()
    large_communities: frozenset[tuple[int, int, int]] = frozenset()
    local_preference: int | None = None


@dataclass(frozen=True)
class Session:
    """One BGP session of this node and the prefixes it advertises on it."""

    peer: Peer
    routes: Mapping[Network, Attributes]


@dataclass(frozen=True)
class Desired:
    """Everything this node's routing daemon should do: its router ID and its sessions."""

    router_id: ipaddress.IPv4Address
    sessions: tuple[Session, ...] = ()

    def prefixes(self) -> set[Network]:
        """Every prefix some session advertises."""
        return {prefix for session in self.sessions for prefix in session.routes}

    def withdrawn(self) -> Desired:
        """The same sessions advertising nothing: what a speaker that is leaving asks for first."""
        return Desired(self.router_id, tuple(Session(s.peer, {}) for s in self.sessions))


def _matches(selector: api.LabelSelector | None, labels: Mapping[str, str] | None) -> bool:
    from layerlb_speaker import inventory  # the API models and selectors load only with BGP

    if selector is None:
        return True
    return labels is not None and inventory.matches(selector, labels)


def selected(intent: Intent, node: str) -> list[Peer]:
    """The peers whose nodeSelector matches `node` (those with a `problem` too: their status says it)."""
    labels = intent.labels.get(node)
    return [peer for peer in intent.peers if _matches(peer.selector, labels)]


def router_id(node_address: str | None, peers: Iterable[Peer]) -> ipaddress.IPv4Address:
    """The first selected peer's routerID, else the node's IPv4 address, else one derived from its name."""
    for peer in peers:
        if peer.router_id is not None:
            return peer.router_id
    if node_address:
        address = ipaddress.ip_address(node_address)
        if address.version == 4:
            return ipaddress.IPv4Address(address)
    return ipaddress.IPv4Address("10.255.255.254")


def desired(intent: Intent, node: str, node_address: str | None, vips: Iterable[Vip]) -> Desired:
    """The sessions this node opens and the routes it advertises on each: see the module's docstring."""
    labels = intent.labels.get(node)
    peers = [peer for peer in selected(intent, node) if not peer.problem]
    mine = [vip for vip in vips if node in vip.advertisers]
    advertising = [ad for ad in intent.advertisements if _matches(ad.selector, labels)]
    sessions = []
    for peer in peers:
        routes: dict[Network, Attributes] = {}
        for ad in advertising:
            if ad.peers and peer.name not in ad.peers:
                continue
            for vip in mine:
                if vip.address.version != peer.address.version:
                    continue
                if ad.pools and (vip.pool is None or vip.pool.name not in ad.pools):
                    continue
                length = ad.length if vip.address.version == 4 else ad.length_v6
                prefix = ipaddress.ip_network(f"{vip.address}/{length}", strict=False)
                routes[prefix] = _merged(routes.get(prefix), ad, peer.ibgp)
        sessions.append(Session(peer, routes))
    return Desired(router_id(node_address, peers), tuple(sessions))


def advertised(intent: Intent, node: str, vips: Iterable[Vip]) -> set[Address]:
    """The VIPs `node` advertises to some peer (what `desired` routes, by address: an aggregated prefix
    stands for every VIP inside it that the node serves)."""
    labels = intent.labels.get(node)
    peers = [peer for peer in selected(intent, node) if not peer.problem]
    advertising = [ad for ad in intent.advertisements if _matches(ad.selector, labels)]
    found: set[Address] = set()
    for vip in vips:
        if node not in vip.advertisers:
            continue
        for peer in peers:
            if vip.address.version == peer.address.version and any(
                (not ad.peers or peer.name in ad.peers)
                and (not ad.pools or (vip.pool is not None and vip.pool.name in ad.pools))
                for ad in advertising
            ):
                found.add(vip.address)
                break
    return found


def advertisers(intent: Intent, nodes: Iterable[str], vips: Iterable[Vip]) -> dict[Address, tuple[str, ...]]:
    """Each VIP some of `nodes` advertise → those nodes, by name."""
    vips = tuple(vips)
    found: dict[Address, list[str]] = {}
    for node in sorted(nodes):
        for address in advertised(intent, node, vips):
            found.setdefault(address, []).append(node)
    return {address: tuple(names) for address, names in found.items()}


def _merged(before: Attributes | None, ad: Advertisement, ibgp: bool) -> Attributes:
    preference = ad.local_preference if ibgp else None
    if before is None:
        return Attributes(frozenset(ad.communities), frozenset(ad.large_communities), preference)
    if before.local_preference is not None and (preference is None or before.local_preference > preference):
        preference = before.local_preference
    return Attributes(
        before.communities | set(ad.communities),
        before.large_communities | set(ad.large_communities),
        preference,
    )


# --- from the resources: one validation path (`layerlb.validation`), here and in the API server --------


def problems_of(kind: str, name: Any, spec: Any) -> tuple[api.Model | None, list[str]]:
    """The `kind` resource named `name` with `spec`, validated as the CLI and the API server do; or None
    and its problems (`peerASN: expected an integer, got 'x'`, paths relative to the spec)."""
    from layerlb import validation  # pydantic and the rules load only with BGP

    document = {"apiVersion": api.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
    try:
        return validation.validate(document), []
    except validation.Invalid as error:
        return None, [_relative(problem.path, problem.message) for problem in error.problems]


def _relative(path: str, message: str) -> str:
    if path == "metadata.name":
        path = "name"
    path = path.removeprefix("spec.").removeprefix("spec")
    return f"{path}: {message}" if path else message


def password_problem(value: str) -> str | None:
    """Why BIRD cannot take `value` as a TCP-MD5 password (None: it can): within TCP-MD5's 80 bytes, and
    what BIRD reads between double quotes unchanged."""
    if PASSWORD.match(value):
        return None
    return "not 1-80 printable ASCII characters without double quotes or backslashes"


def _community(text: str) -> tuple[int, int]:
    if text in WELL_KNOWN:
        return WELL_KNOWN[text]
    first, second = text.split(":")
    return int(first), int(second)


def _large(text: str) -> tuple[int, int, int]:
    first, second, third = text.split(":")
    return int(first), int(second), int(third)


def peer(resource: api.BGPPeer, password: str | None = None) -> Peer:
    """A validated BGPPeer as a session's peer, with the password its Secret (or a static file) holds."""
    spec = resource.spec
    return Peer(
        resource.metadata.name,
        ipaddress.ip_address(spec.peerAddress),
        spec.peerASN,
        spec.localASN,
        spec.peerPort,
        spec.holdTime,
        spec.keepaliveTime,
        password,
        ipaddress.ip_address(spec.sourceAddress) if spec.sourceAddress else None,
        spec.ebgpMultiHop,
        Bfd(spec.bfd.receiveInterval, spec.bfd.transmitInterval, spec.bfd.detectMultiplier) if spec.bfd else None,
        spec.nodeSelector,
        ipaddress.IPv4Address(spec.routerID) if spec.routerID else None,
    )  # fmt: skip


def advertisement(resource: api.BGPAdvertisement) -> Advertisement:
    """A validated BGPAdvertisement as the speaker applies it."""
    spec = resource.spec
    return Advertisement(
        resource.metadata.name,
        tuple(spec.vipPools or ()),
        tuple(spec.peers or ()),
        spec.nodeSelector,
        tuple(_community(text) for text in spec.communities or ()),
        tuple(_large(text) for text in spec.largeCommunities or ()),
        spec.localPreference,
        spec.aggregationLength,
        spec.aggregationLengthV6,
    )


# --- the static configuration's `bgp:` section ---------------------------------------------------------


def _static_password(entry: dict[str, Any], where: str, problems: list[str]) -> tuple[bool, str | None]:
    """(usable, password) from a static entry's `password` or `passwordFile`."""
    if entry.get("passwordFile") is not None:
        path = str(entry["passwordFile"])
        try:
            with open(path, encoding="utf-8") as file:
                value: object = file.read().strip()
        except OSError as error:
            problems.append(f"{where}.passwordFile: {path!r} cannot be read ({error.strerror})")
            return False, None
    else:
        value = entry.get("password")
    if value is None:
        return True, None
    why = password_problem(value) if isinstance(value, str) else "not a string"
    if why is not None:
        problems.append(f"{where}.password: {why}")
        return False, None
    assert isinstance(value, str)
    return True, value


def _static_peer(entry: Any, where: str, problems: list[str]) -> Peer | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: {entry!r} is not a mapping with a name and the BGPPeer spec's fields")
        return None
    spec = {key: value for key, value in entry.items() if key not in ("name", "password", "passwordFile")}
    resource, found = problems_of("BGPPeer", entry.get("name"), spec)
    problems.extend(f"{where}.{line}" for line in found)
    usable, password = _static_password(entry, where, problems)
    if resource is None or not usable:
        return None
    assert isinstance(resource, api.BGPPeer)
    return peer(resource, password)


def _static_advertisement(entry: Any, where: str, problems: list[str]) -> Advertisement | None:
    if not isinstance(entry, dict):
        problems.append(
            f"{where}: {entry!r} is not a mapping with a name and the BGPAdvertisement spec's fields"
        )
        return None
    spec = {key: value for key, value in entry.items() if key != "name"}
    resource, found = problems_of("BGPAdvertisement", entry.get("name"), spec)
    problems.extend(f"{where}.{line}" for line in found)
    if resource is None:
        return None
    assert isinstance(resource, api.BGPAdvertisement)
    return advertisement(resource)


def parse(section: Any, labels: Mapping[str, Mapping[str, str]], problems: list[str]) -> Intent:
    """The `bgp:` section of a static configuration; one line in `problems` per problem of an entry left out."""
    if section is None:
        return Intent(labels=labels)
    if not isinstance(section, dict):
        problems.append(f"bgp: {section!r} is not a mapping with peers and advertisements")
        return Intent(labels=labels)
    peers: list[Peer] = []
    for index, entry in enumerate(_listed(section, "peers", problems)):
        found = _static_peer(entry, f"bgp.peers[{index}]", problems)
        if found is not None and any(other.name == found.name for other in peers):
            problems.append(f"bgp.peers[{index}].name: {found.name} is listed twice; the first entry counts")
        elif found is not None:
            peers.append(found)
    ads: list[Advertisement] = []
    for index, entry in enumerate(_listed(section, "advertisements", problems)):
        ad = _static_advertisement(entry, f"bgp.advertisements[{index}]", problems)
        if ad is not None:
            ads.append(ad)
    return Intent(tuple(peers), tuple(ads), labels)


def _listed(section: Mapping[str, Any], key: str, problems: list[str]) -> list[Any]:
    value = section.get(key) or []
    if not isinstance(value, list):
        problems.append(f"bgp.{key}: {type(value).__name__} is not a list")
        return []
    return value

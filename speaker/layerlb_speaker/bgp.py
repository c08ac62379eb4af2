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
twice). A VIP is routed to a peer when the node is eligible for it (the same eligibility as L2: ready
forwarding pods, a Service's Ready nodes or local endpoints) and an advertisement selects its pool, the
peer and the node. Every eligible node announces, so the router spreads the VIP by ECMP; there is no
holder and no heartbeat. Several advertisements giving a peer the same prefix merge: the union of their
communities, the highest local preference.

Bad entries are reported one line each (`bgp.peers[0].peerASN: 'x' is not an AS number 1-4294967295`) and
skipped, as the rest of the static configuration is.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerlb import api
from layerlb_speaker.announcement import Address, Vip

MAX_ASN = 4_294_967_295
WELL_KNOWN = {
    "no-export": (65535, 65281),
    "no-advertise": (65535, 65282),
    "local-as": (65535, 65283),
    "blackhole": (65535, 666),
}
# What BIRD reads between double quotes unchanged, within TCP-MD5's 80-byte key.
PASSWORD = re.compile(r"^[ !#-\[\]-~]{1,80}$")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

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
    peers = [peer for peer in intent.peers if _matches(peer.selector, labels)]
    mine = [vip for vip in vips if node in vip.eligible]
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


# --- the static configuration's `bgp:` section ---------------------------------------------------------


class _Problems:
    def __init__(self, problems: list[str]) -> None:
        self.lines = problems
        self.bad = False

    def add(self, line: str) -> None:
        self.lines.append(line)
        self.bad = True


def _integer(entry: Mapping[str, Any], key: str, where: str, low: int, high: int, default: int | None,
             problems: _Problems) -> int | None:  # fmt: skip
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        problems.add(f"{where}.{key}: {value!r} is not a whole number {low}-{high}")
        return default
    return value


def _address(entry: Mapping[str, Any], key: str, where: str, problems: _Problems) -> Address | None:
    value = entry.get(key)
    if value is None:
        return None
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        problems.add(f"{where}.{key}: {value!r} is not an IP address")
        return None


def _selector(entry: Mapping[str, Any], where: str, problems: _Problems) -> api.LabelSelector | None:
    value = entry.get("nodeSelector")
    if value is None:
        return None
    try:
        return api.LabelSelector.model_validate(value)
    except ValueError as error:
        problems.add(f"{where}.nodeSelector: {value!r} is not a label selector ({_first_error(error)})")
        return None


def _first_error(error: ValueError) -> str:
    return str(error).splitlines()[-1].strip() if str(error) else type(error).__name__


def _names(entry: Mapping[str, Any], key: str, where: str, problems: _Problems) -> tuple[str, ...]:
    value = entry.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) and NAME.match(item) for item in value):
        problems.add(f"{where}.{key}: {value!r} is not a list of names")
        return ()
    return tuple(value)


def _password(entry: Mapping[str, Any], where: str, problems: _Problems) -> str | None:
    if entry.get("passwordFile") is not None:
        path = str(entry["passwordFile"])
        try:
            with open(path, encoding="utf-8") as file:
                value: object = file.read().strip()
        except OSError as error:
            problems.add(f"{where}.passwordFile: {path!r} cannot be read ({error.strerror})")
            return None
    else:
        value = entry.get("password")
    if value is None:
        return None
    if not isinstance(value, str) or not PASSWORD.match(value):
        problems.add(
            f"{where}.password: not 1-80 printable ASCII characters without double quotes or backslashes"
        )
        return None
    return value


def _bfd(entry: Mapping[str, Any], where: str, problems: _Problems) -> Bfd | None:
    value = entry.get("bfd")
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.add(
            f"{where}.bfd: {value!r} is not a mapping of receiveInterval, transmitInterval, detectMultiplier"
        )
        return None
    receive = _integer(value, "receiveInterval", f"{where}.bfd", 10, 60000, 300, problems)
    transmit = _integer(value, "transmitInterval", f"{where}.bfd", 10, 60000, 300, problems)
    multiplier = _integer(value, "detectMultiplier", f"{where}.bfd", 2, 255, 3, problems)
    assert receive is not None and transmit is not None and multiplier is not None
    return Bfd(receive, transmit, multiplier)


def _peer(entry: Any, where: str, problems: _Problems) -> Peer | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not NAME.match(entry["name"]):
        problems.add(f"{where}: {entry!r} is not a mapping with a name (a DNS subdomain) and peerAddress")
        return None
    problems.bad = False
    address = _address(entry, "peerAddress", where, problems)
    if address is None and not problems.bad:
        problems.add(f"{where}.peerAddress: required")
    peer_asn = _integer(entry, "peerASN", where, 1, MAX_ASN, None, problems)
    local_asn = _integer(entry, "localASN", where, 1, MAX_ASN, None, problems)
    for key, value in (("peerASN", peer_asn), ("localASN", local_asn)):
        if value is None and key not in entry:
            problems.add(f"{where}.{key}: required (an AS number 1-{MAX_ASN})")
    port = _integer(entry, "peerPort", where, 1, 65535, 179, problems)
    hold = _integer(entry, "holdTime", where, 0, 65535, 90, problems)
    keepalive = _integer(entry, "keepaliveTime", where, 0, 65535, None, problems)
    if hold is not None and 0 < hold < 3:
        problems.add(f"{where}.holdTime: {hold} is neither 0 nor 3-65535")
    if hold and keepalive is not None and keepalive >= hold:
        problems.add(f"{where}.keepaliveTime: {keepalive} is not below holdTime {hold}")
    source = _address(entry, "sourceAddress", where, problems)
    if source is not None and address is not None and source.version != address.version:
        problems.add(f"{where}.sourceAddress: {source} is not of peerAddress's family")
    multihop = entry.get("ebgpMultiHop", False)
    if not isinstance(multihop, bool):
        problems.add(f"{where}.ebgpMultiHop: {multihop!r} is not true or false")
    router = _address(entry, "routerID", where, problems)
    if router is not None and (router.version != 4 or int(router) == 0):
        problems.add(f"{where}.routerID: {router} is not a non-zero IPv4 address")
    password = _password(entry, where, problems)
    bfd = _bfd(entry, where, problems)
    selector = _selector(entry, where, problems)
    if problems.bad or address is None or peer_asn is None or local_asn is None:
        return None
    assert port is not None and hold is not None
    return Peer(
        entry["name"], address, peer_asn, local_asn, port, hold, keepalive, password, source, multihop,
        bfd, selector, ipaddress.IPv4Address(router) if router is not None else None,
    )  # fmt: skip


def _communities(entry: Mapping[str, Any], where: str, problems: _Problems) -> tuple[tuple[int, int], ...]:
    found = []
    for index, text in enumerate(entry.get("communities") or []):
        text = str(text)
        if text in WELL_KNOWN:
            found.append(WELL_KNOWN[text])
            continue
        parts = text.split(":")
        if len(parts) != 2 or not all(part.isdigit() and int(part) <= 65535 for part in parts):
            problems.add(
                f"{where}.communities[{index}]: {text!r} is not ASN:VALUE (each 0-65535) or one of "
                + ", ".join(WELL_KNOWN)
            )
            continue
        found.append((int(parts[0]), int(parts[1])))
    return tuple(found)


def _large(entry: Mapping[str, Any], where: str, problems: _Problems) -> tuple[tuple[int, int, int], ...]:
    found = []
    for index, text in enumerate(entry.get("largeCommunities") or []):
        parts = str(text).split(":")
        if len(parts) != 3 or not all(part.isdigit() and int(part) <= MAX_ASN for part in parts):
            problems.add(
                f"{where}.largeCommunities[{index}]: {text!r} is not ASN:VALUE:VALUE (each 0-{MAX_ASN})"
            )
            continue
        found.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return tuple(found)


def _advertisement(entry: Any, where: str, problems: _Problems) -> Advertisement | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not NAME.match(entry["name"]):
        problems.add(f"{where}: {entry!r} is not a mapping with a name (a DNS subdomain)")
        return None
    problems.bad = False
    pools = _names(entry, "vipPools", where, problems)
    peers = _names(entry, "peers", where, problems)
    selector = _selector(entry, where, problems)
    communities = _communities(entry, where, problems)
    large = _large(entry, where, problems)
    preference = _integer(entry, "localPreference", where, 0, MAX_ASN, None, problems)
    length = _integer(entry, "aggregationLength", where, 0, 32, 32, problems)
    length_v6 = _integer(entry, "aggregationLengthV6", where, 0, 128, 128, problems)
    if problems.bad:
        return None
    assert length is not None and length_v6 is not None
    return Advertisement(
        entry["name"], pools, peers, selector, communities, large, preference, length, length_v6
    )


def parse(section: Any, labels: Mapping[str, Mapping[str, str]], problems: list[str]) -> Intent:
    """The `bgp:` section of a static configuration; one line in `problems` per entry left out."""
    report = _Problems(problems)
    if section is None:
        return Intent(labels=labels)
    if not isinstance(section, dict):
        report.add(f"bgp: {section!r} is not a mapping with peers and advertisements")
        return Intent(labels=labels)
    peers: list[Peer] = []
    for index, entry in enumerate(_listed(section, "peers", report)):
        peer = _peer(entry, f"bgp.peers[{index}]", report)
        if peer is not None and any(other.name == peer.name for other in peers):
            report.add(f"bgp.peers[{index}].name: {peer.name} is listed twice; the first entry counts")
        elif peer is not None:
            peers.append(peer)
    ads: list[Advertisement] = []
    for index, entry in enumerate(_listed(section, "advertisements", report)):
        ad = _advertisement(entry, f"bgp.advertisements[{index}]", report)
        if ad is not None:
            ads.append(ad)
    return Intent(tuple(peers), tuple(ads), labels)


def _listed(section: Mapping[str, Any], key: str, problems: _Problems) -> list[Any]:
    value = section.get(key) or []
    if not isinstance(value, list):
        problems.add(f"bgp.{key}: {type(value).__name__} is not a list")
        return []
    return value

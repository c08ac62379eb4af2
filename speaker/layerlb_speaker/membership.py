"""Which speakers are alive: heartbeats in, the live members out, on an injected clock (no sockets here).

Rules, in order:

1. Every speaker sends a heartbeat to every peer each `interval` (default 100 ms) over UDP on the node
   network; a peer is alive while its last heartbeat is at most `dead_after` old (default 500 ms, five
   missed beats). So a dead node or speaker is noticed within `dead_after` + one check, and its VIPs move
   well under a second after it stops; a Kubernetes Lease could not do that (renewals every few seconds
   and a lease duration of 10-15 s is what keeps API load sane; kube-vip's ~3 s failover is that bound).
2. A starting speaker *joins*: for `join` seconds (default `dead_after`) it heartbeats with `ready`
   unset and announces nothing, while it hears who is there. Peers ignore a speaker that is not ready, so
   the VIPs it will take keep being answered by their current holders until it is ready; a restarting
   speaker therefore never moves a VIP held by another node. After joining, the peers not heard are dead.
3. A speaker that hears no one after joining is alone and announces every VIP it is eligible for. This
   is the partition trade-off: if it is cut off from the other speakers but not from the LAN, two nodes
   may answer for a VIP until the partition heals (each of them forwards it, so traffic still flows);
   the alternative, staying silent without a quorum, would drop every VIP of a two-node cluster when one
   node dies. A speaker whose own interface is down rejoins when the link comes back (rule 2), so a cut
   link does not come back announcing everything.
4. Each heartbeat carries `fresh`: whether the sender's view of the Kubernetes API is current. The
   membership only carries the bit; `announcement.holder` prefers fresh speakers.
5. Next to each heartbeat goes an `Unavailable` datagram: the interfaces some VIP asks for (its VIPPool's
   `spec.announce.interfaces`) that the sender cannot answer on (missing or down). `announcement.holder`
   passes over a node that has none of a VIP's interfaces, the same way on every speaker. It is a datagram
   of its own, not more bytes in the heartbeat, because speakers of the previous version check a
   heartbeat's exact length: they ignore the new datagram and still hear the heartbeat.
6. Next to each heartbeat also goes a `Pressure` datagram: how late the sender's own rounds ran lately
   (its longest loop stall over the last `Timing.pressure_window` seconds). A peer is dead after
   `dead_after` plus twice that lateness, at most `max_dead_after` (default 2 s): the suspicion adapts, as
   Lifeguard's local health does for memberlist (MetalLB's member list). A node that was healthy when it
   died is dead after `dead_after`, so failover keeps its speed; a node whose speaker is starved of CPU
   (the rounds run late, the heartbeats with them) says so while it still can, and its peers wait for it
   longer instead of taking its VIPs for a stall (a false takeover: two ARP answers, then a move back).
   An old peer sends no `Pressure`: it is judged by `dead_after` alone.
7. A speaker still joining is no member, but a VIP that nobody holds and that it ranks first for waits
   for it (at most its join period, or until it is dead): without that, the first of several speakers
   starting together would take every VIP and, holding them, keep them. A goodbye heartbeat carries
   `leaving`, so a stopping speaker is not mistaken for a joining one (its VIPs move at once).
8. Next to each heartbeat also go `Holding` datagrams: the VIPs the sender announces now (as many
   datagrams as its VIPs need, `MAX_HOLDING` addresses each). `announcement.holder` keeps a VIP with the
   candidate that holds it, so a VIP moves only when it must. A peer's holding of an address lasts while
   the peer lives and tells it again within its dead-after (a lost datagram is repeated next interval; a
   released VIP is simply no longer told). An old peer tells no holdings: it holds nothing in others' eyes.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from layerlb_speaker.announcement import Address, Member

MAGIC = b"LLBS"
VERSION = 1
_READY, _FRESH, _LEAVING = 0x01, 0x02, 0x04
_HEADER = struct.Struct("!4sBBB")  # magic, version, flags, name length; the node name follows
MAX_NAME = 253  # a Node name is a DNS subdomain


def _pack_named(header: struct.Struct, magic: bytes, value: int, node: str) -> bytes:
    """The datagram `_named` reads: magic, version, `value`, name length, then the UTF-8 node name."""
    name = node.encode()
    return header.pack(magic, VERSION, value, len(name)) + name


def _named(data: bytes, header: struct.Struct, magic: bytes) -> tuple[int, str] | None:
    """A datagram of `header` (magic, version, one value, name length) and exactly the node name after it:
    the value and the name, or None for anything else (another kind or version, noise, a truncation)."""
    if len(data) < header.size:
        return None
    found, version, value, length = header.unpack_from(data)
    if found != magic or version != VERSION or length == 0 or len(data) != header.size + length:
        return None
    try:
        return value, data[header.size :].decode()
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class Heartbeat:
    """One speaker's "I am here": its node name, whether it has joined, whether its API view is fresh, and
    (its goodbye) whether it is leaving rather than joining."""

    node: str
    ready: bool
    fresh: bool
    leaving: bool = False

    def encode(self) -> bytes:
        """The datagram: b"LLBS", version 1, flags, name length, the UTF-8 node name. (A speaker of the
        version before `leaving` reads the goodbye's flags as "not ready", as it did.)"""
        flags = (
            (_READY if self.ready else 0) | (_FRESH if self.fresh else 0) | (_LEAVING if self.leaving else 0)
        )
        return _pack_named(_HEADER, MAGIC, flags, self.node)

    @classmethod
    def decode(cls, data: bytes) -> Heartbeat | None:
        """The heartbeat in a datagram, or None for anything else (another version, noise, a truncation)."""
        found = _named(data, _HEADER, MAGIC)
        if found is None:
            return None
        flags, node = found
        return cls(node, bool(flags & _READY), bool(flags & _FRESH), bool(flags & _LEAVING))


UNAVAILABLE_MAGIC = b"LLBU"
_UNAVAILABLE = struct.Struct("!4sBBB")  # magic, version, name length, count; the name, then each interface
MAX_UNAVAILABLE = 64  # 64 interface names of at most 15 bytes: one datagram of at most 1.3 kB
MAX_INTERFACE = 15  # IFNAMSIZ - 1


@dataclass(frozen=True)
class Unavailable:
    """One speaker's "I cannot answer on these interfaces" (wanted by some VIP, missing or down here)."""

    node: str
    interfaces: frozenset[str] = frozenset()

    def encode(self) -> bytes:
        """b"LLBU", version 1, name length, count, the UTF-8 node name, then each name as length + bytes.

        At most `MAX_UNAVAILABLE` names (the first by name); longer names than an interface's are left out.
        """
        name = self.node.encode()
        names = [each.encode() for each in sorted(self.interfaces)]
        names = [each for each in names if 0 < len(each) <= MAX_INTERFACE][:MAX_UNAVAILABLE]
        body = b"".join(bytes((len(each),)) + each for each in names)
        return _UNAVAILABLE.pack(UNAVAILABLE_MAGIC, VERSION, len(name), len(names)) + name + body

    @classmethod
    def decode(cls, data: bytes) -> Unavailable | None:
        """The message in a datagram, or None for anything else (a heartbeat, noise, a truncation)."""
        if len(data) < _UNAVAILABLE.size:
            return None
        magic, version, length, count = _UNAVAILABLE.unpack_from(data)
        if magic != UNAVAILABLE_MAGIC or version != VERSION or length == 0 or count > MAX_UNAVAILABLE:
            return None
        at = _UNAVAILABLE.size + length
        try:
            node = data[_UNAVAILABLE.size : at].decode()
            names = []
            for _ in range(count):
                size = data[at]
                names.append(data[at + 1 : at + 1 + size].decode())
                if not 0 < size <= MAX_INTERFACE or len(names[-1].encode()) != size:
                    return None
                at += 1 + size
        except (IndexError, UnicodeDecodeError):
            return None
        if at != len(data) or len(node.encode()) != length:
            return None
        return cls(node, frozenset(names))


PRESSURE_MAGIC = b"LLBP"
_PRESSURE = struct.Struct("!4sBHB")  # magic, version, lateness in ms, name length; the node name follows
MAX_LATE_MS = 65535


@dataclass(frozen=True)
class Pressure:
    """One speaker's "my rounds ran this late lately" (its longest recent loop stall, in milliseconds)."""

    node: str
    late_ms: int = 0

    def encode(self) -> bytes:
        """b"LLBP", version 1, the lateness (ms, at most 65,535), name length, the UTF-8 node name."""
        return _pack_named(_PRESSURE, PRESSURE_MAGIC, min(max(self.late_ms, 0), MAX_LATE_MS), self.node)

    @classmethod
    def decode(cls, data: bytes) -> Pressure | None:
        """The message in a datagram, or None for anything else (a heartbeat, noise, a truncation)."""
        found = _named(data, _PRESSURE, PRESSURE_MAGIC)
        if found is None:
            return None
        late, node = found
        return cls(node, late)


HOLDING_MAGIC = b"LLBH"
_HOLDING = struct.Struct("!4sBBB")  # magic, version, name length, count; the name, then each address
MAX_HOLDING = 64  # 64 addresses of at most 1 + 16 bytes: one datagram of at most 1.4 kB


@dataclass(frozen=True)
class Holding:
    """One speaker's "I announce these VIPs" (a share of them: at most `MAX_HOLDING` per datagram)."""

    node: str
    addresses: tuple[Address, ...] = ()

    def encode(self) -> bytes:
        """b"LLBH", version 1, name length, count, the UTF-8 node name, then each address as its IP version
        (4 or 6) and its packed bytes. At most `MAX_HOLDING` addresses (the rest are left out)."""
        name = self.node.encode()
        addresses = self.addresses[:MAX_HOLDING]
        body = b"".join(bytes((address.version,)) + address.packed for address in addresses)
        return _HOLDING.pack(HOLDING_MAGIC, VERSION, len(name), len(addresses)) + name + body

    @classmethod
    def decode(cls, data: bytes) -> Holding | None:
        """The message in a datagram, or None for anything else (a heartbeat, noise, a truncation)."""
        if len(data) < _HOLDING.size:
            return None
        magic, version, length, count = _HOLDING.unpack_from(data)
        if magic != HOLDING_MAGIC or version != VERSION or length == 0 or count > MAX_HOLDING:
            return None
        at = _HOLDING.size + length
        try:
            node = data[_HOLDING.size : at].decode()
        except UnicodeDecodeError:
            return None
        if len(node.encode()) != length:
            return None
        addresses: list[Address] = []
        for _ in range(count):
            if at >= len(data) or data[at] not in (4, 6):
                return None
            size = 4 if data[at] == 4 else 16
            packed = data[at + 1 : at + 1 + size]
            if len(packed) != size:
                return None
            addresses.append(ipaddress.ip_address(packed))
            at += 1 + size
        if at != len(data):
            return None
        return cls(node, tuple(addresses))

    @classmethod
    def split(cls, node: str, addresses: Iterable[Address]) -> list[Holding]:
        """`addresses` (in a stable order) as the datagrams that carry them all; none for none."""
        ordered = sorted(addresses, key=lambda address: (address.version, address.packed))
        return [
            cls(node, tuple(ordered[at : at + MAX_HOLDING])) for at in range(0, len(ordered), MAX_HOLDING)
        ]


@dataclass(frozen=True)
class Timing:
    """Heartbeat interval, how long a silent peer stays alive (at least `dead_after`, at most
    `max_dead_after` for a peer under pressure), how long a starting speaker listens, and how far back a
    speaker's own lateness counts."""

    interval: float = 0.1
    dead_after: float = 0.5
    join: float = 0.5
    max_dead_after: float = 2.0
    pressure_window: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.dead_after:
            raise ValueError(
                f"heartbeat interval {self.interval}s must be positive and below dead_after {self.dead_after}s"
            )
        if self.join < 0:
            raise ValueError(f"join {self.join}s must not be negative")
        if self.max_dead_after < self.dead_after:
            raise ValueError(
                f"max_dead_after {self.max_dead_after}s must not be below dead_after {self.dead_after}s"
            )
        if self.pressure_window <= 0:
            raise ValueError(f"pressure_window {self.pressure_window}s must be positive")

    def dead_after_for(self, late: float) -> float:
        """How long a peer whose rounds ran up to `late` seconds late lately stays alive in silence."""
        return min(self.dead_after + 2 * max(late, 0.0), self.max_dead_after)


@dataclass
class _Peer:
    last_heard: float
    ready: bool
    fresh: bool
    leaving: bool = False


class Membership:
    """The live speakers as node `me` sees them. Call `heard` per heartbeat and `expire` on a timer; both
    return whether `members()` changed, which is when announcements must be recomputed."""

    def __init__(self, me: str, timing: Timing, now: float, fresh: bool = True) -> None:
        self.me = me
        self.timing = timing
        self.fresh = fresh
        self.unavailable: frozenset[str] = frozenset()
        self._peers: dict[str, _Peer] = {}
        self._unavailable: dict[str, frozenset[str]] = {}
        self._late: dict[str, float] = {}  # peer → its last reported lateness, seconds
        self._holds: dict[str, dict[Address, float]] = {}  # peer → address it holds → when it last said so
        self.holds: frozenset[Address] = frozenset()  # what this speaker announces now (`set_holds`)
        self._holding: list[Holding] = []
        self._joined_at = now + timing.join
        self.joined = timing.join == 0
        self.longest_gap: dict[str, float] = {}  # peer → longest time between two of its heartbeats heard
        self.expired: list[tuple[str, float]] = []  # (peer, silence) dropped by the last `expire`

    def heartbeat(self) -> Heartbeat:
        """What this speaker sends now."""
        return Heartbeat(self.me, self.joined, self.fresh)

    def heard(self, beat: Heartbeat, now: float) -> bool:
        """Records a peer's heartbeat (the caller has checked it came from that peer's address)."""
        if beat.node == self.me:
            return False
        before = self._member(beat.node)
        previous = self._peers.get(beat.node)
        if previous is not None:
            gap = now - previous.last_heard
            self.longest_gap[beat.node] = max(gap, self.longest_gap.get(beat.node, 0.0))
        self._peers[beat.node] = _Peer(now, beat.ready, beat.fresh, beat.leaving)
        return self._member(beat.node) != before

    def unavailable_message(self) -> Unavailable:
        """The interfaces this speaker cannot answer on, as sent next to its heartbeat."""
        return Unavailable(self.me, self.unavailable)

    def heard_unavailable(self, message: Unavailable) -> bool:
        """Records which interfaces a peer lacks (the caller checked the address); True if members changed."""
        if message.node == self.me:
            return False
        before = self._member(message.node)
        self._unavailable[message.node] = message.interfaces
        return self._member(message.node) != before

    def heard_pressure(self, message: Pressure) -> None:
        """Records how late a peer's rounds ran lately (the caller checked the address)."""
        if message.node != self.me:
            self._late[message.node] = message.late_ms / 1000

    def heard_holding(self, message: Holding, now: float) -> bool:
        """Records VIPs a peer holds (the caller checked the address); True if it holds one it did not."""
        if message.node == self.me or self._member(message.node) is None:
            return False  # a joining or leaving speaker holds nothing in our eyes, whatever it says
        held = self._holds.setdefault(message.node, {})
        new = any(address not in held for address in message.addresses)
        for address in message.addresses:
            held[address] = now
        return new

    def set_holds(self, addresses: Iterable[Address]) -> None:
        """What this speaker announces now: told to the peers (`holding_messages`) and its own incumbency."""
        self.holds = frozenset(addresses)
        self._holding = Holding.split(self.me, self.holds)  # sent every interval: split once per change

    def holding_messages(self) -> list[Holding]:
        """The datagrams telling the peers every VIP this speaker holds."""
        return self._holding

    def dead_after(self, node: str) -> float:
        """How long `node` may stay silent before it is dead, given the lateness it reported."""
        return self.timing.dead_after_for(self._late.get(node, 0.0))

    def set_unavailable(self, interfaces: frozenset[str]) -> bool:
        """The wanted interfaces this speaker cannot answer on; True if that changed what it may hold."""
        changed, self.unavailable = interfaces != self.unavailable, interfaces
        return changed and self.joined

    def expire(self, now: float) -> bool:
        """Drops peers silent for longer than `dead_after`, and ends the join; True if members changed."""
        changed = False
        self.expired = []
        if not self.joined and now >= self._joined_at:
            self.joined = changed = True
        for node, peer in list(self._peers.items()):
            if now - peer.last_heard > self.dead_after(node):
                self.expired.append((node, now - peer.last_heard))
                del self._peers[node]
                self._unavailable.pop(node, None)
                self._late.pop(node, None)
                changed = changed or peer.ready or not peer.leaving  # a member, or VIPs waiting for it
        for node, held in list(self._holds.items()):
            if node not in self._peers:
                del self._holds[node]
                continue
            for address, told in list(held.items()):
                if now - told > self.dead_after(node):  # released: no longer told
                    del held[address]
                    changed = changed or self._peers[node].ready
        return changed

    def set_fresh(self, fresh: bool) -> bool:
        """Whether this speaker's API view is current; True if that changed."""
        changed, self.fresh = fresh != self.fresh, fresh
        return changed and self.joined

    def rejoin(self, now: float) -> bool:
        """Starts over (our link came back): forget every peer, announce nothing until joined again."""
        changed = self.joined or any(peer.ready for peer in self._peers.values())
        self._peers.clear()
        self._unavailable.clear()
        self._late.clear()
        self._holds.clear()
        self.joined = self.timing.join == 0
        self._joined_at = now + self.timing.join
        return changed

    def _member(self, node: str) -> Member | None:
        peer = self._peers.get(node)
        if peer is None or not peer.ready:
            return None
        held = self._holds.get(node, {})
        return Member(node, peer.fresh, self._unavailable.get(node, frozenset()), frozenset(held))

    def joining(self) -> frozenset[str]:
        """The live peers still joining (heard, not ready, not saying goodbye): a VIP nobody holds and that
        one of them ranks first for waits for it (`announcement.holder`), so speakers starting together
        spread the VIPs by weight instead of the first one taking them all and keeping them."""
        return frozenset(node for node, peer in self._peers.items() if not peer.ready and not peer.leaving)

    def members(self) -> dict[str, Member]:
        """Node name → Member for every ready, live speaker, this one included once it has joined."""
        members = {node: member for node in self._peers if (member := self._member(node)) is not None}
        if self.joined:
            members[self.me] = Member(self.me, self.fresh, self.unavailable, self.holds)
        return members

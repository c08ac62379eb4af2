"""The speaker's loop: inventory and heartbeats in, the VIPs this node holds answered on its interfaces.

Every `interval` it reads the heartbeats waiting in its socket (first, so that a stall of our own loop is
never mistaken for silent peers), expires silent peers, sends its own heartbeat, checks its interfaces,
and — when membership, inventory or links changed — recomputes the whole desired state with
`announcement.mine` and applies the difference: responders hold the new sets at once, newly held VIPs
get `announce_count` gratuitous ARP / unsolicited NA spaced `announce_spacing` apart, and each takeover is
reported (log line; an Event in Kubernetes, and the holder in the owners' status: `statuses`).

Each round also tells the peers how late this speaker's own rounds ran lately (`membership.Pressure`, the
longest loop stall in the window), so that they give a starved speaker longer before taking its VIPs.

Rules beyond `membership`'s: on joining, the speaker sends its first ready heartbeat and waits one
interval before claiming, so the peers release first (no two answers). On SIGTERM it sends a heartbeat
that is not ready before exiting, so the peers take its VIPs over at once instead of after `dead_after`.
Each interface stands alone: one that is missing is reported for its VIPs and retried every `retry`
seconds while the others keep answering; when every interface of the node's is down the speaker rejoins
once one is up again. The interfaces VIPs ask for (their pool's `spec.announce.interfaces`) that this node
lacks or has down go to the peers with every heartbeat (`membership.Unavailable`), so that a VIP is held
by a node that has one of them. A missing one is reported as `InterfaceNotFound`: once per interface on
the VIPPool, and per VIP on its owners by the node that would hold it otherwise. The inventory's
`notices` (a VIP no node may announce under its pool's nodeSelector, an invalid pool) are reported by one
speaker only: the live one ranking first for the VIP (for a pool's own notice, the first by name).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from layerlb_speaker import announcement, framing, heartbeat, links, membership, pool_status, responder
from layerlb_speaker.announcement import Address, Owner, Vip

if TYPE_CHECKING:
    from layerlb_speaker import bgp
    from layerlb_speaker.bgp_announcer import BgpAnnouncer
    from layerlb_speaker.inventory import Notice

log = logging.getLogger("layerlb.speaker")


@dataclass(frozen=True)
class Settings:
    """How this speaker runs: its node, interfaces (empty: the one holding the node's address), timings."""

    node: str
    interfaces: tuple[str, ...] = ()
    port: int = heartbeat.DEFAULT_PORT
    timing: membership.Timing = field(default_factory=membership.Timing)
    announce_count: int = 3
    announce_spacing: float = 0.25
    retry: float = 5.0


@dataclass(frozen=True)
class Inventory:
    """What the speakers announce: the VIPs with their eligible nodes, the peers' heartbeat addresses
    (node → address, this node included: its address selects the default interface), and whether this
    view is current (`fresh`), and what the pools keep from being announced (`notices`), and the pools
    whose `spec.announce.interfaces` this node should have (`pool_interfaces`, for their status) and the
    Nodes that exist (`nodes`: one deleted recomputes, so that its entries in pools' status are removed),
    and the BGP peers and advertisements (`bgp`; None: no BGP)."""

    vips: tuple[Vip, ...] = ()
    peers: Mapping[str, str] = field(default_factory=dict)
    fresh: bool = True
    notices: tuple[Notice, ...] = ()
    pool_interfaces: tuple[pool_status.Wanted, ...] = ()
    nodes: frozenset[str] = frozenset()
    bgp: bgp.Intent | None = None


class Reporter(Protocol):
    """Where takeovers and per-VIP problems go: the log, and Events on the owning objects."""

    def announcing(self, vip: Vip, node: str, interface: str) -> None: ...

    def problem(self, vip: Vip, reason: str, message: str) -> None: ...

    def pool_problem(self, pool: Owner, reason: str, message: str) -> None: ...


class Publisher(Protocol):
    """Where the whole desired state goes after each recomputation, to show who announces in status
    (`kube.StatusPublisher`; `statuses` decides what to write): every VIP, every VIP's holder, the live
    speakers, and the interfaces this node answers each of its VIPs on."""

    def publish(
        self,
        vips: tuple[Vip, ...],
        holders: Mapping[Address, str],
        members: Mapping[str, announcement.Member],
        held_on: Mapping[Address, tuple[str, ...]],
        advertisers: Mapping[Address, tuple[str, ...]],
    ) -> None: ...


class PoolStatus(Protocol):
    """Where this node's missing pool interfaces go after each recomputation (`kube.PoolStatusPublisher`:
    the VIPPools' `status.nodes`), with the live speakers (the first by name removes Nodes' stale entries)."""

    def publish(
        self, missing: Mapping[Owner, pool_status.Entry], members: Mapping[str, announcement.Member]
    ) -> None: ...


class LogReporter:
    """The reporter of a static configuration: log lines only."""

    def announcing(self, vip: Vip, node: str, interface: str) -> None:
        log.info("announcing %s from %s on %s (%s)", vip.address, node, interface, _owners(vip))

    def problem(self, vip: Vip, reason: str, message: str) -> None:
        log.error("%s: %s (%s)", reason, message, _owners(vip))

    def pool_problem(self, pool: Owner, reason: str, message: str) -> None:
        log.error("%s: VIPPool %s: %s", reason, pool.name, message)


def _owners(vip: Vip) -> str:
    return ", ".join(str(owner) for owner in vip.owners) or "static"


class Speaker:
    """One node's speaker. `update` feeds it inventory (from any thread-safe caller in the loop); `run`
    runs it until `stop` is set."""

    def __init__(self, settings: Settings, reporter: Reporter, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.reporter = reporter
        self.publisher: Publisher | None = None  # who announces, into status (Kubernetes only)
        self.pool_status: PoolStatus | None = None  # missing pool interfaces, into status (Kubernetes only)
        self.bgp: BgpAnnouncer | None = None  # routes to BGP peers, from every eligible node
        self._pool_missing: dict[Owner, pool_status.Entry] = {}
        self.clock = clock
        self.inventory = Inventory()
        self.membership = membership.Membership(settings.node, settings.timing, clock())
        self.responders: dict[str, responder.InterfaceResponder] = {}
        self.held: dict[tuple[Address, str], Vip] = {}
        self.holders: dict[Address, str] = {}
        self._failed: dict[str, float] = {}  # interface → when opening it last failed
        self._reported: set[tuple[str, Address]] = set()
        # Per held (address, interface): the owners told `Announcing`. An address keeps its holder when
        # its owner changes (a LoadBalancer deleted, another given the same address): the new owner is
        # told too, though nothing was taken over.
        self._told: dict[tuple[Address, str], frozenset[Owner]] = {}
        self._pool_reported: set[tuple[str, str]] = set()  # (pool, interface) reported missing
        self._kept: set[tuple[Address, str]] = set()  # (VIP, holder) this node ranks first for, logged
        self._noticed: set[tuple[str, str]] = set()  # (reason, message) of notices reported
        self._up: dict[str, bool] = {}
        self._offline = False
        self._dirty = True
        self._claim_after = 0.0
        self._logged_gap: dict[str, float] = {}  # peer → longest heartbeat gap logged
        self._last_tick: float | None = None
        self._longest_stall = 0.0
        # The stalls of the last `pressure_window` seconds as a sliding-window maximum: (when, stall), the
        # stalls decreasing from the left, so the first is the longest still in the window.
        self._stalls: collections.deque[tuple[float, float]] = collections.deque()
        self._socket: heartbeat.HeartbeatSocket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def update(self, inventory: Inventory) -> None:
        """New inventory: recomputed at the next tick."""
        self.inventory = inventory
        if self.membership.set_fresh(inventory.fresh):
            log.warning(
                "API view %s", "current again" if inventory.fresh else "stale: keeping the last known state"
            )
        if self._socket is not None:
            self._socket.set_peers(inventory.peers)
        self._dirty = True

    def _heard(self, beat: heartbeat.Message) -> None:
        if isinstance(beat, membership.Holding):
            if self.membership.heard_holding(beat, self.clock()):
                self._dirty = True
        elif isinstance(beat, membership.Pressure):
            before = self.membership.dead_after(beat.node)
            self.membership.heard_pressure(beat)
            after = self.membership.dead_after(beat.node)
            if abs(after - before) >= self.settings.timing.interval / 2:
                log.info(
                    "peer %s: its rounds run up to %.3f s late; allowing it %.3f s of silence",
                    beat.node,
                    beat.late_ms / 1000,
                    after,
                )
        elif isinstance(beat, membership.Unavailable):
            if self.membership.heard_unavailable(beat):
                log.info("peer %s cannot answer on: %s", beat.node, ", ".join(sorted(beat.interfaces)) or "-")
                self._dirty = True
        else:
            if self.membership.heard(beat, self.clock()):
                log.info("peer %s %s", beat.node, "joined" if beat.ready else "left")
                self._dirty = True
            gap = self.membership.longest_gap.get(beat.node, 0.0)
            if gap > max(2 * self.settings.timing.interval, self._logged_gap.get(beat.node, 0.0)):
                self._logged_gap[beat.node] = gap
                log.info("heartbeat gap: %s %.3f s (the longest from it so far)", beat.node, gap)

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeats, link checks and reconciliation every interval until `stop`; then a goodbye."""
        loop = asyncio.get_running_loop()
        ipv6 = any(":" in address for address in self.inventory.peers.values())
        self._socket = heartbeat.HeartbeatSocket(self.settings.port, loop, self._heard, ipv6)
        self._socket.set_peers(self.inventory.peers)
        interval = self.settings.timing.interval
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except Exception:  # one bad tick must not end the node's announcements
                    log.exception("speaker tick failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            self._socket.send(
                membership.Heartbeat(self.settings.node, False, self.membership.fresh, leaving=True),
                self.settings.node,
            )
            self._socket.close()
            for each in self.responders.values():
                each.close()
            self.responders.clear()

    def tick(self) -> None:
        """One round: heartbeats in and out, links, and the desired state if anything changed."""
        assert self._socket is not None
        now = self.clock()
        if self._last_tick is not None:
            # How much later than asked this tick runs: the event loop was busy or the process not scheduled.
            stall = now - self._last_tick - self.settings.timing.interval
            if stall > max(self.settings.timing.interval, self._longest_stall):
                self._longest_stall = stall
                log.info("loop stalled %.3f s (the longest so far)", stall)
            self._record_stall(now, stall)
        self._last_tick = now
        self._socket.drain()
        self._check_links(now)
        was_joined = self.membership.joined
        if self.membership.expire(now):
            self._dirty = True
        for node, silence in self.membership.expired:
            log.warning("peer %s dead after %.3f s without a heartbeat", node, silence)
        if self.membership.joined and not was_joined:
            log.info("joined: live peers %s", sorted(self.membership.members()))
            print(f"joined {self.settings.node}", flush=True)
            self._claim_after = now + self.settings.timing.interval
        self._socket.send(self.membership.unavailable_message(), self.settings.node)
        self._socket.send(
            membership.Pressure(self.settings.node, round(self.late() * 1000)), self.settings.node
        )
        for holding in self.membership.holding_messages():
            self._socket.send(holding, self.settings.node)
        self._socket.send(self.membership.heartbeat(), self.settings.node)
        if self._dirty and now >= self._claim_after:
            self._dirty = False
            self.reconcile()

    def _record_stall(self, now: float, stall: float) -> None:
        window = self.settings.timing.pressure_window
        while self._stalls and self._stalls[-1][1] <= stall:
            self._stalls.pop()
        self._stalls.append((now, max(stall, 0.0)))
        while self._stalls[0][0] < now - window:
            self._stalls.popleft()

    def late(self) -> float:
        """This speaker's longest loop stall in the last `pressure_window` seconds: how late its heartbeats
        may come, told to the peers (`membership.Pressure`) so that they wait that much longer for it."""
        return self._stalls[0][1] if self._stalls else 0.0

    def default_interfaces(self) -> tuple[str, ...]:
        """The configured interfaces, else the one holding this node's address."""
        if self.settings.interfaces:
            return self.settings.interfaces
        address = self.inventory.peers.get(self.settings.node)
        found = links.holding(address) if address else None
        return (found,) if found else ()

    def _check_links(self, now: float) -> None:
        wanted = set(self.default_interfaces()) | {i for vip in self.inventory.vips for i in vip.interfaces}
        for name in sorted(wanted - set(self.responders)):
            if now - self._failed.get(name, -1e9) >= self.settings.retry:
                self._open(name, now)
        states = {name: links.is_up(name) for name in self.responders}
        for name, up in states.items():
            if self._up.get(name, True) != up:
                log.warning("link %s %s", name, "up" if up else "down")
        self._up = states
        asked = {name for vip in self.inventory.vips for name in vip.interfaces}
        unavailable = frozenset(name for name in asked if not states.get(name, False))
        if self.membership.set_unavailable(unavailable):
            log.info("cannot answer on: %s", ", ".join(sorted(unavailable)) or "-")
            self._dirty = True
        self._check_pool_interfaces(states, asked)
        node_links = [name for name in self.default_interfaces() if name in states]
        offline = bool(node_links) and not any(states[name] for name in node_links)
        if offline:
            # Off the LAN: hold nothing, and keep joining so that the link coming back starts a fresh join
            # instead of finding every peer expired and claiming every VIP.
            if not self._offline:
                log.warning(
                    "every node link is down (%s): announcing nothing until one is up", ", ".join(node_links)
                )
            if self.membership.rejoin(now):
                self._dirty = True
        elif self._offline:
            log.warning("link up again: rejoining")
        self._offline = offline

    def _check_pool_interfaces(self, states: Mapping[str, bool], asked: set[str]) -> None:
        """The pools' interfaces this node lacks or has down, judged as for the peers where a VIP asks for
        them (its responder up), else by the link itself (a pool with no address in use opens no socket);
        a change recomputes, which publishes it."""
        if self.pool_status is None:
            return
        names = {name for each in self.inventory.pool_interfaces for name in each.interfaces}
        up = {name: states.get(name, False) if name in asked else links.is_up(name) for name in names}
        found = pool_status.missing(self.inventory.pool_interfaces, up)
        if found != self._pool_missing:
            self._pool_missing = found
            self._dirty = True

    def _open(self, name: str, now: float) -> None:
        try:
            self.responders[name] = responder.InterfaceResponder(name, asyncio.get_running_loop())
        except OSError as error:
            first = name not in self._failed
            self._failed[name] = now
            if first:
                log.error("interface %s: %s; its VIPs are not announced there (retrying)", name, error)
            return
        self._failed.pop(name, None)
        self._dirty = True
        log.info("interface %s: answering as %s", name, framing.mac_text(self.responders[name].mac))

    def reconcile(self) -> None:
        """Computes which VIPs this node holds and applies it to every interface, and what it routes."""
        members = self.membership.members()
        self._route(self.inventory.vips)
        # L2 from here on: a pool's `spec.announce.l2: false` leaves its VIPs to BGP alone (no holder, no
        # ARP/NDP); their status names the live nodes advertising them (`statuses`, rule 4).
        bgp_only = tuple(vip for vip in self.inventory.vips if not vip.l2)
        vips = tuple(vip for vip in self.inventory.vips if vip.l2)
        self.holders = announcement.announcements(vips, members, self.membership.joining())
        self._report_kept(vips, members)
        mine = [vip for vip in vips if self.holders.get(vip.address) == self.settings.node]
        defaults = self.default_interfaces()
        wanted: dict[tuple[Address, str], Vip] = {}
        for vip in mine:
            interfaces = vip.interfaces or defaults
            if not interfaces:
                self._problem(
                    vip,
                    "",
                    "NoInterface",
                    f"no interface to announce {vip.address} on node {self.settings.node}: set --interface",
                )
            for name in interfaces:
                if name in self.responders:
                    wanted[(vip.address, name)] = vip
        per_interface: dict[str, list[Address]] = {name: [] for name in self.responders}
        for address, name in wanted:
            per_interface[name].append(address)
        for name, addresses in per_interface.items():
            self.responders[name].hold(addresses)
        taken = [pair for pair in wanted if pair not in self.held]
        for address, name in self.held.keys() - wanted.keys():
            log.info("withdrawing %s on %s (now %s)", address, name, self.holders.get(address, "nobody"))
        self.held = wanted
        # Told to the peers from the next heartbeat on: they keep these VIPs here while this node may hold them.
        self.membership.set_holds(address for address, _ in wanted)
        if self.publisher is not None:
            held_on: dict[Address, tuple[str, ...]] = {}
            for address, name in wanted:
                held_on[address] = (*held_on.get(address, ()), name)
            self.publisher.publish(
                vips + bgp_only, self.holders, members, held_on, self._advertisers(bgp_only, members)
            )
        self._report_missing(vips, members)
        if self.pool_status is not None:
            self.pool_status.publish(self._pool_missing, members)
        self._report_notices(members)
        self._reported = {
            key for key in self._reported if key[1] in self.holders or key[0].endswith("InterfaceNotFound")
        }
        for pair, vip in wanted.items():
            untold = [owner for owner in vip.owners if owner not in self._told.get(pair, frozenset())]
            if pair in taken or untold:
                told = vip if pair in taken else dataclasses.replace(vip, owners=tuple(untold))
                self.reporter.announcing(told, self.settings.node, pair[1])
        self._told = {pair: frozenset(vip.owners) for pair, vip in wanted.items()}
        if taken:
            task = asyncio.get_running_loop().create_task(self._announce(taken))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log.info("holding %d of %d VIPs; live speakers %s", len(mine), len(vips), sorted(members))

    def _report_kept(self, vips: tuple[Vip, ...], members: Mapping[str, announcement.Member]) -> None:
        """Logs, once per VIP and holder, a VIP this node ranks first for that stays with its holder: why
        the VIP is not where the hash alone would put it."""
        me = self.settings.node
        kept = set()
        for vip in vips:
            holder = self.holders.get(vip.address)
            if holder is not None and holder != me and announcement.first_by_weight(vip, members) == me:
                kept.add((vip.address, holder))
                if (vip.address, holder) not in self._kept:
                    log.info(
                        "%s stays on %s, its holder, though this node ranks first for it: a move would cut "
                        "its connections",
                        vip.address,
                        holder,
                    )
        self._kept = kept

    def _route(self, vips: tuple[Vip, ...]) -> None:
        """BGP: every VIP this node is eligible for goes to the peers its advertisements name (no holder)."""
        if self.bgp is None:
            return
        from layerlb_speaker import bgp  # loads the API models: BGP only

        intent = self.inventory.bgp or bgp.Intent()
        node = self.settings.node
        self.bgp.want(bgp.desired(intent, node, self.inventory.peers.get(node), vips))

    def _advertisers(
        self, vips: tuple[Vip, ...], members: Mapping[str, announcement.Member]
    ) -> dict[Address, tuple[str, ...]]:
        """The live nodes advertising each of `vips` over BGP, as each would compute it (`bgp.advertisers`)."""
        if not vips or self.inventory.bgp is None:
            return {}
        from layerlb_speaker import bgp  # loads the API models: BGP only

        return bgp.advertisers(self.inventory.bgp, members, vips)

    def _report_missing(self, vips: tuple[Vip, ...], members: Mapping[str, announcement.Member]) -> None:
        """InterfaceNotFound for the interfaces VIPs ask for that this node lacks: once per pool and
        interface on the VIPPool, once per VIP on its owners by the node that would hold it otherwise."""
        me = self.settings.node
        missing_now: set[tuple[str, Address]] = set()
        pools_now: set[tuple[str, str]] = set()
        for vip in vips:
            if me not in vip.eligible:
                continue
            for name in vip.interfaces:
                if name in self.responders:
                    continue
                missing_now.add((name + "InterfaceNotFound", vip.address))
                if vip.pool is not None:
                    pools_now.add((vip.pool.name, name))
                    self._pool_interface_missing(vip.pool, name)
                if announcement.holder(dataclasses.replace(vip, interfaces=()), members) != me:
                    continue
                now = self.holders.get(vip.address)
                where = f"VIPPool {vip.pool.name} spec.announce.interfaces" if vip.pool else "its interfaces"
                self._problem(
                    vip,
                    name,
                    "InterfaceNotFound",
                    f"interface {name} not found on node {me} ({where}); {vip.address} is not announced there"
                    + (f", {now} announces it" if now and now != me else ""),
                )
        # A pool whose addresses are not in use yet (so no VIP above) still names interfaces this node
        # should have (`_check_pool_interfaces`, Kubernetes only): the same Warning, before the first Service.
        for pool, entry in self._pool_missing.items():
            for name in entry.missing:
                pools_now.add((pool.name, name))
                self._pool_interface_missing(pool, name)
        # Forget what is fixed, so that it is reported again if it comes back.
        self._pool_reported &= pools_now
        self._reported = {
            key for key in self._reported if not key[0].endswith("InterfaceNotFound") or key in missing_now
        }

    def _pool_interface_missing(self, pool: Owner, name: str) -> None:
        """InterfaceNotFound on the VIPPool, once per pool and interface while it stays missing."""
        if (pool.name, name) in self._pool_reported:
            return
        self._pool_reported.add((pool.name, name))
        self.reporter.pool_problem(
            pool,
            "InterfaceNotFound",
            f"spec.announce.interfaces: interface {name} not found on node {self.settings.node}; "
            "the pool's addresses are not announced on it there",
        )

    def _report_notices(self, members: Mapping[str, announcement.Member]) -> None:
        """The inventory's notices, from the one live speaker that ranks first for each."""
        current: set[tuple[str, str]] = set()
        for notice in self.inventory.notices:
            key = (notice.reason, notice.message)
            current.add(key)
            if key in self._noticed or not members:
                continue
            if notice.vip is not None:
                reporter = announcement.rank(notice.vip.address, members)[0]
            else:
                reporter = min(members)
            if reporter != self.settings.node:
                continue
            self._noticed.add(key)
            if notice.vip is not None:
                self.reporter.problem(notice.vip, notice.reason, notice.message)
            if notice.pool is not None:
                self.reporter.pool_problem(notice.pool, notice.reason, notice.message)
        self._noticed &= current

    def _problem(self, vip: Vip, interface: str, reason: str, message: str) -> None:
        key = (interface + reason, vip.address)
        if key not in self._reported:
            self._reported.add(key)
            self.reporter.problem(vip, reason, message)

    async def _announce(self, pairs: list[tuple[Address, str]]) -> None:
        """Gratuitous ARP / unsolicited NA for newly held VIPs, `announce_count` rounds, yielding as it goes."""
        for round_ in range(self.settings.announce_count):
            if round_:
                await asyncio.sleep(self.settings.announce_spacing)
            for sent, (address, name) in enumerate(pairs, 1):
                held = self.responders.get(name)
                if (address, name) in self.held and held is not None:
                    held.announce(address)
                if sent % 256 == 0:
                    await asyncio.sleep(0)


def parse_address(text: str) -> Address:
    """An IPv4 or IPv6 address; ValueError with the text otherwise."""
    return ipaddress.ip_address(text)

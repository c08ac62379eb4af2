"""The IPVS kernel engine, so that `nat`, `dsr` and `tunnel` LoadBalancers forward in the kernel with IPVS.

**What it programs** is exactly what `layerlb.render.ipvs_rules` renders for the Plan (format `ipvs`): the engine
takes `ipvs_rules.ipvs_services(plan)` — one virtual service per listener (TCP `-t`, UDP `-u`), the scheduler
from `ipvs_rules.ipvs_scheduler`, persistence (`-p`) for ClientIP affinity, real servers with their weights
and `-m` (nat), `-g` (dsr) or `-i` (tunnel) — and changes two things only. The weight of a real server
whose target is not usable (health down) becomes 0: IPVS schedules no new connection to a server of
weight 0 and keeps forwarding the ones it has. And the hashing schedulers get their fallback flag
(`-b sh-fallback`, `-b mh-fallback`): without it, `sh` and `mh` keep hashing clients to a server of
weight 0 and then find no destination, so the clients of a down or draining server are refused instead
of moved (checked in the guest); with it they go to the next available server. (The render carries the flag: `ipvs_rules.IPVS_SCHEDULER_FLAGS`.)

**Why netlink, and not `ipvsadm` or pyroute2.** The engine speaks IPVS's generic netlink family itself
(`netlink`): a sync's changes go to the kernel in a few batched `sendmsg` calls, and the table is
read by one dump of the services plus `/proc/net/ip_vs` for their real servers (the kernel's own listing
of servers, weights, methods and connection counts, read without a process). `ipvsadm -R` (one message
and one round trip per line, one process) took 6.4 s for 11,000 changes in the QEMU/TCG guest where this
path takes 0.35 s, and `ipvsadm -Ln` (a dump per service, then text to parse) took 1.3 s where the dump
and /proc take 0.3 s — the no-op re-sync budget cannot afford the listing. pyroute2 decodes every
attribute into Python objects, the cost to avoid at 11,000 messages. The changes are still logged and
reported in ipvsadm's syntax (`Change`), the render's own, so an operator can read and replay them; a
change the kernel refuses is reported with its ipvsadm line and the kernel's reason (`IpvsError`), and
does not stop the others (as with `ipvsadm -R`).

**Ownership.** IPVS has no comments or owners. A VIP belongs to exactly one LoadBalancer (a VIPPool
never hands out an address twice), so the engine owns every TCP and UDP virtual service whose address
is the VIP of a Plan it syncs, and nothing else: services on other addresses, fwmark and SCTP services
are never written (another tool's services live next to layerlb's untouched). Owning by VIP rather
than by (VIP, port, protocol) lets a restarted engine remove a listener that went away while it was down.
Two Plans with the same VIP in one engine are refused.

**Desired state.** A sync reads the kernel's table, computes the difference to the Plan, and writes
only that: `-A`/`-E` (scheduler, flags, persistence) for services, `-a`/`-e`/`-d` for real servers, `-D`
for services gone. Applying the same Plan twice writes nothing (`changes == 0`). A restarted engine (a
new instance) therefore adopts what it finds: an unchanged Plan makes no write, and no connection
notices.

**The no-op fast path.** Most syncs change nothing (the data plane re-syncs every few seconds), and
reading a table of 1,000 services x 10 servers into objects costs more than comparing /proc's lines
with what the last sync left. So after a full sync the engine keeps a fingerprint of the VIP's part of
`/proc/net/ip_vs` (the kernel's own listing: services, schedulers, persistence, real servers,
forwarding methods and weights; connection counts left out). A later sync with the same desired state
(same Plan object, same target verdicts), no drain pending, and an unchanged fingerprint is done:
nothing to write. What /proc does not show (scheduler flags, persistence engines and masks) is checked
by a netlink dump of the services at least every `full_check_seconds`. Anything else (a Plan or
health change, a hand edit either check sees, a new engine) takes the full path: read, compare, write
the difference.

**Drain.** A real server gone from the Plan (or whose target is `draining`) is first set to weight 0,
then deleted (`-d`) once its connections have ended: when IPVS counts no active and no inactive
connection for it, or, for TCP, when every connection entry left for it (`/proc/net/ip_vs_conn`) is in
TIME_WAIT or CLOSE — connections that are over but that IPVS keeps for up to two minutes and that
deleting the server cannot disturb. After `drain_seconds` it is deleted anyway. UDP flows count as
inactive until IPVS expires them (its UDP timeout), so a UDP drain usually ends by `drain_seconds`.
A listener gone from the Plan drains the same way, and its service is deleted when its last server is.
A drain progresses on each sync; `next_resync` says when to sync again while one is pending.
With persistence, `net.ipv4.vs.expire_quiescent_template` is set to 1, or a client whose persistence
template points at a weight-0 server would keep being sent there (kube-proxy sets it for the same reason).

**The VIP address** is added where the architecture needs it, as a host address (/32, /128):
`nat` on `lo` (IPVS takes packets for local addresses; the node answers ARP for it with the default
`arp_ignore=0`), `dsr` and `tunnel` on the LB's interface (`device`, else the interface the route to the
VIP leaves by), where the LB must answer ARP for the VIP on the clients' segment. IPv4 addresses carry
the label `<device>:llb`, so that `remove` deletes only an address the engine added (IPv6 has no labels:
`remove` deletes the VIP's /128). A VIP that is already local is left as it is. `nat` also needs IP
forwarding (the backends' replies are routed through the node, and IPVS translates them on the way);
`forwarding=True` (the default) turns it on, and nothing turns it off again.

**Strict ARP** (`strict_arp=True`, what a forwarding pod gets from the operator): the L2 speaker answers
ARP/NDP for the VIP from one elected node, so no node's kernel may answer for it too. Every architecture
then puts the VIP on `lo` (IPVS takes packets for any local address, as kube-proxy's IPVS mode does with
its dummy interface) and, for an IPv4 VIP, `strict_arp.check` sets `arp_ignore=1` / `arp_announce=2`
before the VIP is added; a node where that cannot be done is reported in `SyncReport.warnings`. An address
on an interface would be answered by that interface's kernel whatever `arp_ignore` says, so `dsr` and
`tunnel` leave the interface only here: standalone (no speaker) they keep needing the kernel's answer.

`remove(plan)` (an explicit shutdown of the LoadBalancer) deletes the VIP's services at once, without
draining, and the VIP address. The engine runs `ip` in the network namespace of the
calling thread, and its netlink socket is opened there. Not thread-safe: one engine per thread.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from layerlb import api
from layerlb import plan as plan_model
from layerlb.render import ipvs_rules, shared
from layerlb_dataplane.core.state import Target
from layerlb_dataplane.kernel import SyncReport, addresses
from layerlb_dataplane.kernel import strict_arp as strict_arp_module
from layerlb_dataplane.kernel.ipvs import netlink

log = logging.getLogger("layerlb.kernel.ipvs")

DEFAULT_DRAIN_SECONDS: Final = 120.0
DRAIN_POLL_SECONDS: Final = 1.0
VIP_LABEL_SUFFIX: Final = ":llb"
IFNAME_MAX: Final = 15
LOCAL: Final = "LOCAL"  # /proc's "Local": the real server is this node; the kernel chose the method
FORWARD_FLAGS: Final = {"Masq": "-m", "Route": "-g", "Tunnel": "-i", "Local": LOCAL}
# IPVS connection states of TCP connections that are over (NONE: persistence templates, not connections).
FINISHED_STATES: Final = frozenset({"TIME_WAIT", "CLOSE", "NONE"})
CONNECTION_TABLES: Final = ("/proc/thread-self/net/ip_vs_conn", "/proc/net/ip_vs_conn")
SERVICE_TABLES: Final = ("/proc/thread-self/net/ip_vs", "/proc/net/ip_vs")
DEFAULT_FULL_CHECK_SECONDS: Final = 30.0
EXPIRE_QUIESCENT: Final = "/proc/sys/net/ipv4/vs/expire_quiescent_template"

ServerKey = tuple[str, int]  # (address, port) of a real server


class IpvsError(RuntimeError):
    """IPVS refused changes or cannot be reached; the message names each change in ipvsadm's words and the
    kernel's reason."""


@dataclass(frozen=True, order=True)
class ServiceKey:
    """A virtual service as IPVS identifies it: protocol, address (canonical form) and port."""

    protocol: str  # "TCP" or "UDP"
    address: str
    port: int

    @property
    def option(self) -> str:
        """`-t 192.0.2.10:80`: how ipvsadm names the service."""
        flag = "-u" if self.protocol == "UDP" else "-t"
        return f"{flag} {shared.host_port(self.address, self.port)}"


@dataclass
class RealServer:
    """A real server of a virtual service; the counts are the kernel's (0 in a desired state)."""

    address: str
    port: int
    forward: str  # "-m", "-g", "-i", or LOCAL (read from the kernel only)
    weight: int
    active: int = 0
    inactive: int = 0

    @property
    def key(self) -> ServerKey:
        return (self.address, self.port)

    @property
    def target(self) -> str:
        """`-r 10.0.2.11:8080`."""
        return f"-r {shared.host_port(self.address, self.port)}"

    def option(self, *, forward: str | None = None, weight: int | None = None) -> str:
        """`-r 10.0.2.11:8080 -m -w 2`, the render's own spelling."""
        method = forward or self.forward
        return f"{self.target} {method} -w {self.weight if weight is None else weight}"


@dataclass
class VirtualService:
    """A virtual service with its real servers: one listener of a Plan, or one the kernel holds."""

    key: ServiceKey
    scheduler: str
    persistence: int | None
    flags: str | None = None  # scheduler flags, `-b`: sh-fallback, mh-fallback
    extra: tuple[str, ...] = ()  # what the kernel shows that layerlb never sets (ops, mask, pe, ...)
    servers: dict[ServerKey, RealServer] = field(default_factory=dict)

    @property
    def settings(self) -> tuple[str, str | None, int | None, tuple[str, ...]]:
        """What `-E` sets: two services with equal settings need no edit."""
        return (self.scheduler, self.flags, self.persistence, self.extra)

    def definition(self) -> str:
        """`-t VIP:80 -s wrr -p 600`, as the render writes it after `-A` (with `-b FLAGS` when set)."""
        flags = "" if self.flags is None else f" -b {self.flags}"
        persistence = "" if self.persistence is None else f" -p {self.persistence}"
        return f"{self.key.option} -s {self.scheduler}{flags}{persistence}"


@dataclass(frozen=True, slots=True)
class Change:
    """One change a sync makes, named by ipvsadm's option: `-A`/`-E`/`-D` a service, `-a`/`-e`/`-d` a real
    server. `str()` is the ipvsadm line (for logs and errors); `request()` the netlink message."""

    verb: str
    key: ServiceKey
    service: VirtualService | None = None  # -A, -E
    server: RealServer | None = None  # -a, -e, -d

    def __str__(self) -> str:
        if self.service is not None:
            return f"{self.verb} {self.service.definition()}"
        if self.server is None:
            return f"{self.verb} {self.key.option}"
        if self.verb == "-d":
            return f"-d {self.key.option} {self.server.target}"
        return f"{self.verb} {self.key.option} {self.server.option()}"

    def request(self) -> netlink.Request:
        command = CHANGE_COMMANDS[self.verb]
        if self.service is not None:
            service = self.service
            return netlink.Request(
                command, _service_attr(self.key, service.scheduler, service.flags, service.persistence)
            )
        if self.server is None:
            return netlink.Request(command, _service_attr(self.key))
        server = self.server
        if self.verb == "-d":
            return netlink.Request(command, _service_attr(self.key) + _dest_attr(server.address, server.port))
        dest = _dest_attr(server.address, server.port, server.forward, server.weight)
        return netlink.Request(command, _service_attr(self.key) + dest)


CHANGE_COMMANDS: Final = {
    "-A": netlink.CMD_NEW_SERVICE,
    "-E": netlink.CMD_SET_SERVICE,
    "-D": netlink.CMD_DEL_SERVICE,
    "-a": netlink.CMD_NEW_DEST,
    "-e": netlink.CMD_SET_DEST,
    "-d": netlink.CMD_DEL_DEST,
}


@functools.lru_cache(maxsize=65536)
def _service_attr(
    key: ServiceKey, scheduler: str | None = None, flags: str | None = None, persistence: int | None = None
) -> bytes:
    """The service attribute of a request: identity only, or a full entry when `scheduler` is given.
    Cached: every real server of a service repeats it."""
    identity = netlink.service_identity(key.protocol, key.address, key.port)
    if scheduler is None:
        return netlink.nested(netlink.CMD_ATTR_SERVICE, identity)
    bits = netlink.scheduler_flag_bits(scheduler, flags)
    if persistence is not None:
        bits |= netlink.F_PERSISTENT
    settings = netlink.service_settings(
        scheduler, bits, persistence or 0, netlink.default_netmask(key.address)
    )
    return netlink.nested(netlink.CMD_ATTR_SERVICE, identity, settings)


@functools.lru_cache(maxsize=65536)
def _dest_attr(address: str, port: int, forward: str | None = None, weight: int | None = None) -> bytes:
    return netlink.nested(netlink.CMD_ATTR_DEST, netlink.dest_attrs(address, port, forward, weight))


# --- parsing ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def canonical(address: str) -> str:
    """The one spelling of an address that the Plan, ipvsadm and /proc are compared in."""
    return ipaddress.ip_address(address).compressed


@functools.lru_cache(maxsize=65536)
def split_host_port(text: str) -> tuple[str, int]:
    """`10.0.0.1:80` or `[2001:db8::1]:80` (ipvsadm's and the render's form) -> (address, port)."""
    host, _, port = text.rpartition(":")
    return canonical(host.strip("[]")), int(port)


def proc_servers(text: str, vip: str | None = None) -> dict[ServiceKey, dict[ServerKey, RealServer]]:
    """The real servers (with weights, methods and connection counts) of the TCP and UDP services in
    /proc/net/ip_vs, of `vip` or of every address, by service: the part of the table the netlink service
    dump does not carry."""
    prefixes = proc_service_prefixes(vip) if vip is not None else ("TCP  ", "UDP  ")
    found: dict[ServiceKey, dict[ServerKey, RealServer]] = {}
    current: dict[ServerKey, RealServer] | None = None
    for line in text.splitlines():
        if line.startswith("  -> "):
            if current is None:
                continue
            words = line.split()
            if len(words) < 6:
                continue
            address, port = _proc_host_port(words[1])
            forward = FORWARD_FLAGS.get(words[2], words[2])
            current[(address, port)] = RealServer(
                address, port, forward, int(words[3]), int(words[4]), int(words[5])
            )
        elif line.startswith(prefixes):
            protocol, host_port = line.split(None, 2)[:2]
            address, port = _proc_host_port(host_port)
            current = found[ServiceKey(protocol, address, port)] = {}
        else:
            current = None  # a header, or a service of a kind layerlb does not own
    return found


def service_from_entry(entry: netlink.ServiceEntry) -> VirtualService:
    """A service of the netlink dump in the engine's terms: persistence from its flag and timeout, the
    scheduler flags by ipvsadm's names, and in `extra` what layerlb never sets (`ops`, a persistence
    mask other than one client address, a persistence engine), so a hand edit of them is seen."""
    key = ServiceKey(entry.protocol, canonical(entry.address), entry.port)
    persistent = bool(entry.flags & netlink.F_PERSISTENT)
    extra: list[str] = []
    if entry.flags & netlink.F_ONEPACKET:
        extra.append("ops")
    if persistent and entry.netmask != netlink.default_netmask(key.address):
        extra += ["mask", entry.netmask.hex()]
    if entry.pe:
        extra += ["pe", entry.pe]
    flags = netlink.scheduler_flag_names(entry.scheduler, entry.flags)
    return VirtualService(key, entry.scheduler, entry.timeout if persistent else None, flags, tuple(extra))


def parse_server_option(text: str) -> RealServer:
    """The render's `-r ADDRESS:PORT -m -w WEIGHT` -> a RealServer."""
    return RealServer(*_server_fields(text))


@functools.lru_cache(maxsize=65536)
def _server_fields(text: str) -> tuple[str, int, str, int]:
    """Cached: the listeners of a Plan repeat the same real servers."""
    words = text.split()
    if len(words) != 5 or words[0] != "-r" or words[3] != "-w":
        raise ValueError(f"unexpected real server in the ipvs render: {text!r}")
    address, port = split_host_port(words[1])
    return address, port, words[2], int(words[4])


@functools.lru_cache(maxsize=65536)
def parse_service_option(text: str) -> ServiceKey:
    """The render's `-t ADDRESS:PORT` (or `-u`) -> a ServiceKey."""
    flag, _, host_port = text.partition(" ")
    if flag not in ("-t", "-u"):
        raise ValueError(f"unexpected virtual service in the ipvs render: {text!r}")
    address, port = split_host_port(host_port)
    return ServiceKey("TCP" if flag == "-t" else "UDP", address, port)


@functools.lru_cache(maxsize=65536)
def _proc_address(text: str) -> str:
    """/proc/net/ip_vs and ip_vs_conn write IPv4 as 8 hex digits, IPv6 in colon form."""
    if len(text) == 8 and ":" not in text:
        return str(ipaddress.IPv4Address(int(text, 16)))
    return canonical(text.strip("[]"))


@functools.lru_cache(maxsize=65536)
def _proc_host_port(text: str) -> tuple[str, int]:
    """/proc/net/ip_vs's `0A000002:1F90` or `[2001:0db8:...:0005]:01BB` -> (address, port)."""
    host, _, port = text.rpartition(":")
    return _proc_address(host), int(port, 16)


def proc_service_prefixes(vip: str) -> tuple[str, ...]:
    """How /proc/net/ip_vs starts the lines of TCP and UDP services on `vip` (IPv4 in hex, IPv6 in full)."""
    address = ipaddress.ip_address(vip)
    spelled = f"{int(address):08X}" if address.version == 4 else f"[{address.exploded}]"
    return (f"TCP  {spelled}:", f"UDP  {spelled}:")


def proc_fingerprint(text: str, vip: str) -> tuple[str, ...]:
    """The lines of /proc/net/ip_vs about `vip`'s services and their real servers, connection counts
    left out: equal fingerprints mean nothing layerlb programs there changed in between (as far as /proc
    shows)."""
    prefixes = proc_service_prefixes(vip)
    lines: list[str] = []
    ours = False
    for line in text.splitlines():
        if line.startswith("  -> "):
            if ours:
                lines.append(line.rsplit(None, 2)[0])
        else:
            ours = line.startswith(prefixes)
            if ours:
                lines.append(line.rstrip())
    return tuple(lines)


def parse_connections(text: str) -> set[tuple[str, str, int, str, int]]:
    """(protocol, VIP, port, real server, port) of every IPVS connection entry that is not over, so a
    drained server can be deleted while IPVS still keeps its finished (TIME_WAIT) connections."""
    live: set[tuple[str, str, int, str, int]] = set()
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) < 8 or words[7] in FINISHED_STATES:
            continue
        protocol, _, _, vaddr, vport, daddr, dport = words[:7]
        live.add((protocol, _proc_address(vaddr), int(vport, 16), _proc_address(daddr), int(dport, 16)))
    return live


# --- the engine ------------------------------------------------------------------------------------


class IpvsEngine:
    """Programs `nat`, `dsr` and `tunnel` Plans into IPVS, so the kernel forwards them: desired state, own
    VIPs only, removals drained.

    `device` (dsr, tunnel): the interface that gets the VIP, instead of the one the route to the VIP
    leaves by. `drain_seconds`: the longest a removed real server keeps its connections. `forwarding`
    (nat): turn IP forwarding on. `expire_quiescent` (persistence): set `expire_quiescent_template`.
    `strict_arp`: the speaker answers for the VIP, so it goes on `lo` and the node stops answering ARP.
    `full_check_seconds`: the longest the fast path goes without checking the services' settings that
    /proc does not show (0: at every sync). `clock` is for tests.
    """

    def __init__(
        self,
        *,
        device: str | None = None,
        drain_seconds: float = DEFAULT_DRAIN_SECONDS,
        forwarding: bool = True,
        expire_quiescent: bool = True,
        full_check_seconds: float = DEFAULT_FULL_CHECK_SECONDS,
        strict_arp: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.strict_arp = strict_arp_module.StrictArp() if strict_arp else None
        self.drain_seconds = drain_seconds
        self.forwarding = forwarding
        self.expire_quiescent = expire_quiescent
        self.full_check_seconds = full_check_seconds
        self.clock = clock
        self._vips: dict[str, str] = {}  # Plan key -> the VIP it was last synced with
        self._drain_since: dict[tuple[ServiceKey, ServerKey], float] = {}
        self._next: dict[str, float] = {}  # Plan key -> when a pending drain wants a sync
        self._desired: dict[str, _Desired] = {}  # Plan key -> the last desired state computed
        self._checked: dict[str, _Checked] = {}  # Plan key -> what the last full sync left in /proc

    # --- the contract --------------------------------------------------------------------------------

    def sync(self, plan: plan_model.Plan, targets: Mapping[str, Sequence[Target]]) -> SyncReport:
        """Makes IPVS forward `plan` with `targets`' health and drain, writing nothing when it already does,
        so that the data plane can call it on every change and on a timer.

        Raises ValueError for a Plan IPVS cannot forward (or whose VIP another Plan of this engine has),
        IpvsError when IPVS refuses a change or is missing.
        """
        started = time.perf_counter()
        desired = self._cached_desired(plan, targets)
        vip = canonical(plan.vip)
        for key, other in self._vips.items():
            if other == vip and key != plan.key:
                raise ValueError(f"{plan.key}: VIP {vip} is already {key}'s in this IPVS engine")
        changes = 0
        previous = self._vips.get(plan.key)
        if previous is not None and previous != vip:  # the VIP moved: the old one goes, as in `remove`
            changes += self._remove_vip_services(previous)
            self._remove_vip(previous)
            changes += 1
        self._vips[plan.key] = vip
        if not self._unchanged(plan.key, desired, vip):
            self._checked.pop(plan.key, None)
            owned, listing = self._read(vip)
            commands, next_sync = self._difference(plan, desired, owned)
            if commands:
                self._apply(commands)
                log.info("%s: %d IPVS change(s)", plan.key, len(commands))
            changes += len(commands)
            if next_sync is None:
                self._next.pop(plan.key, None)
                fingerprint = self._fingerprint(vip) if commands else proc_fingerprint(listing, vip)
                self._checked[plan.key] = _Checked(desired, fingerprint, self.clock())
            else:
                self._next[plan.key] = next_sync
        warnings: tuple[str, ...] = ()
        if self.strict_arp is not None and not shared.is_ipv6(vip):  # before the VIP is there to answer
            checked = self.strict_arp.check()
            changes += checked.changes
            warnings = (checked.warning,) if checked.warning else ()
        changes += self._ensure_vip(plan, vip)
        changes += self._ensure_sysctls(plan, vip)
        return SyncReport(changes=changes, seconds=time.perf_counter() - started, warnings=warnings)

    def remove(self, plan: plan_model.Plan) -> None:
        """Deletes every virtual service on the Plan's VIP and the VIP, because the LoadBalancer is gone (so
        no drain)."""
        vips = {canonical(plan.vip)}
        previous = self._vips.pop(plan.key, None)
        if previous is not None:
            vips.add(previous)
        for vip in sorted(vips):
            self._remove_vip_services(vip)
            self._remove_vip(vip)
        self._next.pop(plan.key, None)
        self._desired.pop(plan.key, None)
        self._checked.pop(plan.key, None)
        for mark in [mark for mark in self._drain_since if mark[0].address in vips]:
            del self._drain_since[mark]

    def next_resync(self, plan: plan_model.Plan) -> float | None:
        """When (on `clock`) to sync `plan` again so a pending drain can end; None when none is pending."""
        return self._next.get(plan.key)

    # --- what a sync wants ---------------------------------------------------------------------------

    def desired(
        self, plan: plan_model.Plan, targets: Mapping[str, Sequence[Target]]
    ) -> dict[ServiceKey, VirtualService]:
        """The virtual services `plan` renders to, with weight 0 for real servers whose target is not usable
        (and the fallback flag of a hashing scheduler).

        A target marked `draining` is left out (it drains like an endpoint gone from the Plan).
        """
        reason = ipvs_rules.unsupported(plan)
        if reason is not None:
            raise ValueError(reason)
        backend = shared.serving_backend(plan)
        given = {(t.address, t.port): t for t in targets.get(backend.name, ())}
        verdicts = [given.get((e.address, e.port)) for e in backend.endpoints]
        kept = [target is None or not target.draining for target in verdicts]
        usable = [target is None or target.usable for target in verdicts]
        # Listeners repeat the same real servers: one (never mutated) object per line and verdict.
        made: dict[tuple[str, bool], RealServer] = {}
        services: dict[ServiceKey, VirtualService] = {}
        for rendered in ipvs_rules.ipvs_services(plan):
            key = parse_service_option(rendered.service)
            service = VirtualService(key, rendered.scheduler, rendered.persistence, rendered.flags)
            for text, keep, up in zip(rendered.servers, kept, usable, strict=True):
                if not keep:
                    continue
                server = made.get((text, up))
                if server is None:
                    server = made[(text, up)] = parse_server_option(text)
                    if not up:
                        server.weight = 0
                service.servers[server.key] = server
            services[key] = service
        return services

    def _cached_desired(
        self, plan: plan_model.Plan, targets: Mapping[str, Sequence[Target]]
    ) -> dict[ServiceKey, VirtualService]:
        """`desired`, computed again only when the Plan (object) or a target's verdict changed: on a
        no-op sync of a large Plan, rendering it would cost more than everything else."""
        cached = self._desired.get(plan.key)
        if cached is None or cached.plan is not plan:
            services = self.desired(plan, targets)  # validates the Plan first
            self._desired[plan.key] = _Desired(plan, _verdicts(plan, targets), services)
            return services
        verdicts = _verdicts(plan, targets)
        if verdicts != cached.verdicts:
            services = self.desired(plan, targets)
            self._desired[plan.key] = _Desired(plan, verdicts, services)
            return services
        return cached.services

    def _unchanged(self, key: str, desired: Mapping[ServiceKey, VirtualService], vip: str) -> bool:
        """The fast path: the kernel still holds what the last full sync left for this desired state."""
        checked = self._checked.get(key)
        if checked is None or checked.desired is not desired or key in self._next:
            return False
        if self._fingerprint(vip) != checked.fingerprint:
            return False
        now = self.clock()
        if now - checked.at >= self.full_check_seconds:
            if self._settings(vip) != {k: service.settings for k, service in desired.items()}:
                return False
            self._checked[key] = dataclasses.replace(checked, at=now)
        return True

    def _settings(self, vip: str) -> dict[ServiceKey, tuple[str, str | None, int | None, tuple[str, ...]]]:
        """The settings of the TCP and UDP services on `vip`, from one netlink dump."""
        with _connect() as socket:
            entries = socket.services(vip)
        return {service.key: service.settings for service in map(service_from_entry, entries)}

    def _fingerprint(self, vip: str) -> tuple[str, ...]:
        return proc_fingerprint(_read_service_table(), vip)

    # --- the kernel's table --------------------------------------------------------------------------

    def read(self, vip: str) -> dict[ServiceKey, VirtualService]:
        """The TCP and UDP virtual services on `vip` in this network namespace, with their real servers'
        weights and connection counts, for the full comparison with the desired state."""
        return self._read(canonical(vip))[0]

    def _read(self, vip: str) -> tuple[dict[ServiceKey, VirtualService], str]:
        """`read`, and the /proc listing it used (a sync that changes nothing takes its fingerprint)."""
        with _connect() as socket:
            entries = socket.services(vip)
        listing = _read_service_table()
        servers = proc_servers(listing, vip)
        services: dict[ServiceKey, VirtualService] = {}
        for entry in entries:
            service = service_from_entry(entry)
            service.servers = servers.get(service.key, {})
            services[service.key] = service
        return services, listing

    def _apply(self, changes: Sequence[Change]) -> None:
        """Sends all `changes` to the kernel in order; any refused one makes the sync fail (the others
        are in place, and the next sync retries from what the kernel then holds)."""
        with _connect() as socket:
            failures = socket.apply([change.request() for change in changes])
        if failures:
            shown = "; ".join(f"`{changes[f.index]}`: {f.reason}" for f in failures[:5])
            more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
            raise IpvsError(f"IPVS refused {len(failures)} of {len(changes)} change(s): {shown}{more}")

    def _difference(
        self,
        plan: plan_model.Plan,
        desired: Mapping[ServiceKey, VirtualService],
        owned: Mapping[ServiceKey, VirtualService],
    ) -> tuple[list[Change], float | None]:
        """The changes that turn `owned` into `desired`, and when a pending drain wants a sync."""
        now = self.clock()
        method = ipvs_rules.IPVS_FORWARDING[plan.architecture]
        drains = _Drains(self, now, method)
        commands: list[Change] = []
        for key, want in desired.items():
            have = owned.get(key)
            if have is None:
                commands.append(Change("-A", key, want))
                commands += [Change("-a", key, server=server) for server in want.servers.values()]
                continue
            if have.settings != want.settings:
                commands.append(Change("-E", key, want))
            for server_key, server in want.servers.items():
                if self._drain_since:
                    self._drain_since.pop((key, server_key), None)
                current = have.servers.get(server_key)
                if current is None:
                    commands.append(Change("-a", key, server=server))
                elif current.weight != server.weight or current.forward not in (server.forward, LOCAL):
                    commands.append(Change("-e", key, server=server))
            for server_key, current in have.servers.items():
                if server_key not in want.servers:
                    commands += drains.step(key, current)
        for key, have in owned.items():
            if key in desired:
                continue
            steps = [change for current in have.servers.values() for change in drains.step(key, current)]
            if all(change.verb == "-d" for change in steps) and drains.waiting(key) == 0:
                commands.append(Change("-D", key))  # every server is drained: the service goes with them
            else:
                commands += steps
        for mark in [
            m for m in self._drain_since if m[0].address == canonical(plan.vip) and m not in drains.seen
        ]:
            del self._drain_since[mark]  # gone from the kernel by other means
        return commands, drains.next_sync()

    def _remove_vip_services(self, vip: str) -> int:
        commands = [Change("-D", key) for key in sorted(self.read(vip))]
        if commands:
            self._apply(commands)
        return len(commands)

    def _finished(
        self, key: ServiceKey, server: RealServer, live: set[tuple[str, str, int, str, int]]
    ) -> bool:
        """Whether a drained real server carries no connection that is not over (see the module docstring)."""
        if server.active + server.inactive == 0:
            return True
        if key.protocol != "TCP" or server.active > 0:
            return False
        return (key.protocol, key.address, key.port, server.address, server.port) not in live

    # --- the node ------------------------------------------------------------------------------------

    def _vip_device(self, plan: plan_model.Plan, vip: str) -> str:
        if plan.architecture is api.Architecture.nat or self.strict_arp is not None:
            return "lo"
        if self.device is not None:
            return self.device
        routes = addresses.ip_json("route", "get", vip)
        if not routes or not routes[0].get("dev"):
            raise ValueError(
                f"{plan.key}: no route to the VIP {vip} tells which interface should own it; give the engine a device"
            )
        return str(routes[0]["dev"])

    def _ensure_vip(self, plan: plan_model.Plan, vip: str) -> int:
        if addresses.is_local(vip):
            return 0
        device = self._vip_device(plan, vip)
        if shared.is_ipv6(vip):
            done = _ip("-6", "addr", "add", f"{vip}/128", "dev", device, "nodad")
        else:
            label = f"{device}{VIP_LABEL_SUFFIX}"
            extra = ["label", label] if len(label) <= IFNAME_MAX else []
            done = _ip("addr", "add", f"{vip}/32", "dev", device, *extra)
        if done.returncode != 0 and "File exists" not in done.stderr:
            raise OSError(f"adding the VIP {vip} to {device}: {done.stderr.strip()}")
        if device == "lo":
            _ip("link", "set", "lo", "up")
        log.info("%s: VIP %s added to %s", plan.key, vip, device)
        return 1

    def _remove_vip(self, vip: str) -> None:
        v6 = shared.is_ipv6(vip)
        host = 128 if v6 else 32
        for link in addresses.ip_json("addr", "show", "to", f"{vip}/{host}"):
            device = str(link.get("ifname", ""))
            for info in addresses.infos(link):
                if info.get("local") is None or canonical(str(info["local"])) != vip:
                    continue
                if info.get("prefixlen") != host:
                    continue
                label = str(info.get("label", ""))
                ours = (
                    v6 or label.endswith(VIP_LABEL_SUFFIX) or len(device) + len(VIP_LABEL_SUFFIX) > IFNAME_MAX
                )
                if ours:
                    _ip("-6" if v6 else "-4", "addr", "del", f"{vip}/{host}", "dev", device)

    def _ensure_sysctls(self, plan: plan_model.Plan, vip: str) -> int:
        changes = 0
        if plan.architecture is api.Architecture.nat and self.forwarding:
            v6 = shared.is_ipv6(vip)
            path = "/proc/sys/net/ipv6/conf/all/forwarding" if v6 else "/proc/sys/net/ipv4/ip_forward"
            changes += _set_sysctl(path, "1")
        if self.expire_quiescent and plan.session_affinity.type is api.AffinityType.ClientIP:
            changes += _set_sysctl(EXPIRE_QUIESCENT, "1")
        return changes


@dataclass(frozen=True)
class _Desired:
    """A desired state and what it was computed from (the Plan object is immutable)."""

    plan: plan_model.Plan
    verdicts: tuple[str, ...]
    services: dict[ServiceKey, VirtualService]


@dataclass(frozen=True)
class _Checked:
    """What a full sync left: the desired state it made true, /proc's fingerprint of it, and when the
    services' settings were last read."""

    desired: Mapping[ServiceKey, VirtualService]
    fingerprint: tuple[str, ...]
    at: float


def _verdicts(plan: plan_model.Plan, targets: Mapping[str, Sequence[Target]]) -> tuple[str, ...]:
    """What `desired` reads of the targets, endpoint by endpoint: equal verdicts, equal desired state."""
    backend = shared.serving_backend(plan)
    given = {(t.address, t.port): t for t in targets.get(backend.name, ())}
    return tuple(_verdict(given.get((e.address, e.port))) for e in backend.endpoints)


def _verdict(target: Target | None) -> str:
    if target is None:
        return "absent"
    if target.draining:
        return "draining"
    return "usable" if target.usable else "unusable"


class _Drains:
    """One sync's view of draining real servers: which step each takes, and when to look again."""

    def __init__(self, engine: IpvsEngine, now: float, method: str) -> None:
        self.engine = engine
        self.now = now
        self.method = method
        self.seen: set[tuple[ServiceKey, ServerKey]] = set()
        self._waiting: dict[ServiceKey, int] = {}
        self._ends: list[float] = []
        self._live: set[tuple[str, str, int, str, int]] | None = None

    def step(self, key: ServiceKey, server: RealServer) -> list[Change]:
        """Weight 0 first; `-d` once its connections are over or its drain time is up; else wait."""
        mark = (key, server.key)
        self.seen.add(mark)
        since = self.engine._drain_since.setdefault(mark, self.now)
        if server.weight != 0:
            self._wait(key, since)
            forward = self.method if server.forward == LOCAL else server.forward
            return [Change("-e", key, server=dataclasses.replace(server, forward=forward, weight=0))]
        if self.now - since >= self.engine.drain_seconds or self.engine._finished(key, server, self.live()):
            del self.engine._drain_since[mark]
            self.seen.discard(mark)
            return [Change("-d", key, server=server)]
        self._wait(key, since)
        return []

    def waiting(self, key: ServiceKey) -> int:
        return self._waiting.get(key, 0)

    def live(self) -> set[tuple[str, str, int, str, int]]:
        if self._live is None:
            self._live = parse_connections(_read_connection_table())
        return self._live

    def next_sync(self) -> float | None:
        if not self._ends:
            return None
        return min(self.now + DRAIN_POLL_SECONDS, min(self._ends))

    def _wait(self, key: ServiceKey, since: float) -> None:
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self._ends.append(since + self.engine.drain_seconds)


# --- helpers ---------------------------------------------------------------------------------------


def _connect() -> netlink.IpvsNetlink:
    """A netlink socket to IPVS in the calling thread's network namespace."""
    try:
        return netlink.IpvsNetlink()
    except OSError as error:
        raise IpvsError(f"IPVS is not reachable: {error.strerror or error}") from error


def _read_service_table() -> str:
    """/proc/net/ip_vs of the calling thread's network namespace ("" without IPVS)."""
    return _read_first(SERVICE_TABLES)


def _read_connection_table() -> str:
    """IPVS' connection entries of the calling thread's network namespace."""
    return _read_first(CONNECTION_TABLES)


def _read_first(paths: Sequence[str]) -> str:
    """The first of `paths` that exists (/proc/thread-self/net follows the thread's namespace; older
    kernels only have /proc/net)."""
    for path in paths:
        try:
            with open(path) as file:
                return file.read()
        except FileNotFoundError:
            continue
    return ""


def _set_sysctl(path: str, value: str) -> int:
    with open(path) as file:
        if file.read().strip() == value:
            return 0
    with open(path, "w") as file:
        file.write(value + "\n")
    return 1


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)

"""The nftables kernel engine, so that `nat` and `dsr` LoadBalancers forward in the kernel where IPVS is absent.

What it programs is exactly what `layerlb.render.nftables_ruleset` renders for the Plan (format `nftables`), loaded as one
`nft -f` transaction that replaces this LoadBalancer's own table, `layerlb_<namespace>_<name>`, and no
other. The engine adds only what the kernel state at sync time decides:

- **Health.** The render is of an *effective* Plan: endpoints whose target is not usable take no new
  flows. `nat`: their weight becomes 0 (the renderer leaves them out of the map); conntrack keeps every
  established connection on the backend it was translated to, across any number of re-syncs. `dsr`:
  a stateless `fwd` has no conntrack, and the map hashes `jhash(flow) mod total`, so changing `total`
  would move established flows of *healthy* backends too. The engine therefore keeps `total` fixed and
  hands a down endpoint's hash slots, one by one, to the usable endpoints in weighted turn (a down
  endpoint of weight 3 becomes three weight-1 entries that point at others). Flows of healthy backends
  stay where they are; only the down backend's flows move (they were lost anyway). When it comes back,
  flows that started on its slots during the outage move back to it and are reset.
- **Drain** (a target `draining`: removed from the Plan, or drained on purpose). `nat`: it leaves the map
  at once; conntrack finishes its connections. `dsr`: nothing on this node sees a DSR connection (the
  replies bypass it, `fwd` keeps no state), so neither `Target.active` nor conntrack can tell when its
  flows end, and dropping it from the map would reshuffle flows of every backend. The engine keeps a
  draining target in the map, in the hash slots it held, for `drain_seconds` (it keeps taking a share of
  new flows meanwhile — a stateless hash cannot tell a new flow from an old one), then drops it; the
  Plan's own layout then applies, which moves some flows of the others (as any Plan change does with
  `jhash mod total`). `next_resync` says when a drain ends, so the caller re-syncs then.
- **Flows that change node (ECMP), `dsr`.** A router spreading the VIP over several nodes moves
  established flows to another node when a node joins or leaves. Every node renders the same
  `jhash(client address . port) mod total seed <the LoadBalancer's>` over the same map (endpoints sorted
  by address), and `fwd` keeps no state, so the new node forwards a mid-flow packet to the backend the
  flow already has. Measured in `tests/kernel/test_ecmp_netns.py` (`make bench-ecmp`): 0 of 100
  long-lived connections reset when a 4th node joins and when one leaves. `nat` cannot: a moved flow
  meets a node without its conntrack entry, which translates it afresh (and masquerades it with its own
  address), and the backend resets it — every moved flow, about half of them on a join.
- **DSR addresses.** The device is the one the route to the backends leaves by (constructor `device`
  overrides it); every backend must be on-link there (no gateway: DSR needs one L2 segment). The
  device's MAC comes from `ip link`; each backend's MAC from the neighbour table, after a one-byte UDP
  datagram to its discard port (9) makes the kernel resolve (or re-verify) it. A backend whose MAC does
  not resolve within `neighbour_timeout` is treated as down.
- **The VIP.** Both architectures need VIP packets delivered to this node: the engine adds the VIP as a
  host address (/32, /128) on `lo`, IPv4 labelled `lo:llb` so that `remove` deletes only the address it
  added. With the default `arp_ignore=0` the node answers ARP for it on every interface (clients on the
  link of a standalone `dsr` LB need that). If the VIP is already local (any interface), nothing is added.
- **Strict ARP** (`strict_arp=True`, what a forwarding pod gets from the operator): the L2 speaker answers
  for the VIP from one elected node, so before an IPv4 VIP is added `strict_arp.check` makes the node stop
  answering ARP for loopback addresses (`arp_ignore=1`, `arp_announce=2`); a node where that cannot be
  done is reported in `SyncReport.warnings` (forwarding works regardless).
- **The VIP guard.** The VIP is a node address, so the node would accept packets to it on any port and
  a client of the VIP would reach every socket bound to the node's wildcard address (sshd, the kubelet,
  host-network admin ports: kubernetes/kubernetes#72236). The table rejects what is sent to the VIP but
  not to a listener's protocol and port (ICMP passes): nat in an input-hook chain, dsr at the end of its
  ingress chain (so on the dsr device only). A VIP the node already had as its own address is not
  guarded: its other ports are the node's (sshd on it, replies to the node's own connections).
- **Masquerade** (`nat` only) is not in the Plan: it is a property of the node's network (do backends
  route replies back through it?), so it is the constructor option `masquerade`. `nat` also needs IP
  forwarding; `forwarding=True` (the default) turns it on (it is never turned off again).

Idempotence: the table's comment holds `layerlb sha256:<digest>` of the rendered ruleset (its loaded
lines, not its `#` comments). A sync skips the transaction (changes 0) when the kernel's digest is the
desired one and the table's listing equals the one this instance last loaded or adopted (a hand-edited
table is replaced). Listing is itself skipped while the kernel's nftables generation (bumped by every
committed transaction, anyone's) is the one at which the table was last verified, so a no-op sync costs
a render and one netlink round trip. A new instance over the same kernel state adopts it: 0 changes, no
flow disturbed. The engine talks to nftables through libnftables in-process (the library `nft` itself
is built on; a buffer is parsed and committed as one transaction exactly as `nft -f` does with a
file), falling back to the `nft` command when the library cannot be loaded. Not thread-safe: one engine
per thread. `SyncReport.changes` counts kernel writes: the table transaction, the VIP address, the
forwarding switch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import re
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from layerlb import api
from layerlb import plan as plan_model
from layerlb.render import nftables_ruleset, shared
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.kernel import SyncReport, addresses
from layerlb_dataplane.kernel import strict_arp as strict_arp_module

log = logging.getLogger("layerlb.kernel.nftables")

COMMENT_PREFIX: Final = "layerlb sha256:"
DISCARD_PORT: Final = 9
DEFAULT_DRAIN_SECONDS: Final = 60.0
DEFAULT_NEIGHBOUR_TIMEOUT: Final = 3.0

_COMMENT = re.compile(r'^\s*comment "' + re.escape(COMMENT_PREFIX) + r'([0-9a-f]{64})"\s*$', re.MULTILINE)
_ATF_COM: Final = 0x2  # /proc/net/arp: the entry is complete
# Netlink numbers of the ruleset generation request (linux/netfilter/nfnetlink.h, nf_tables.h).
_NETLINK_NETFILTER: Final = 12
_NFNL_SUBSYS_NFTABLES: Final = 10
_NFT_MSG_NEWGEN: Final = 15
_NFT_MSG_GETGEN: Final = 16
_NFTA_GEN_ID: Final = 1
_NLM_F_REQUEST: Final = 1

Key = tuple[str, int | None]  # (address, port) of an endpoint, as the Plan and Target spell them


class NftError(RuntimeError):
    """nftables refused a command; the message holds nft's own error text."""


class Nft(Protocol):
    """Runs nft commands: a whole buffer is one transaction, as with `nft -f`."""

    def run(self, commands: str) -> str:
        """Runs `commands`; returns nft's output; raises NftError with nft's message on failure."""
        ...


class LibNft:
    """nft through libnftables in this process: no fork per command, so a no-op sync costs microseconds.

    `nft_run_cmd_from_buffer` is what `nft -f` runs on a file's content: one batch, one transaction.
    """

    def __init__(self, library: str = "libnftables.so.1") -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("nftables") or library, use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._ctx = ctypes.c_void_p(lib.nft_ctx_new(0))  # NFT_CTX_DEFAULT
        if not self._ctx.value:
            raise OSError("libnftables: nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str) -> str:
        """Runs `commands` as one transaction; returns the output buffer."""
        status = int(self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode()))
        output = bytes(self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        error = bytes(self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if status != 0:
            raise NftError(error.strip() or f"nft failed ({status})")
        return output

    def __del__(self) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is not None and ctx.value:
            self._lib.nft_ctx_free(ctx)
            ctx.value = None


class NftCommand:
    """nft through the `nft` command, reading the commands from stdin (`nft -f -`): the fallback."""

    def __init__(self, binary: str = "nft", timeout: float = 60.0) -> None:
        self.binary = binary
        self.timeout = timeout

    def run(self, commands: str) -> str:
        """Runs `commands` as one transaction; returns stdout."""
        done = subprocess.run(
            [self.binary, "-f", "-"], input=commands, capture_output=True, text=True, timeout=self.timeout
        )
        if done.returncode != 0:
            raise NftError(done.stderr.strip() or f"nft failed ({done.returncode})")
        return done.stdout


def default_nft() -> Nft:
    """libnftables when it loads, else the `nft` command."""
    try:
        return LibNft()
    except OSError as error:
        log.info("libnftables unavailable (%s); using the nft command", error)
        return NftCommand()


def ruleset_digest(ruleset: str) -> str:
    """sha256 of the lines nft loads (not `#` comments or blank lines): what the kernel would hold."""
    loaded = [line.strip() for line in ruleset.splitlines()]
    text = "\n".join(line for line in loaded if line and not line.startswith("#"))
    return hashlib.sha256(text.encode()).hexdigest()


def ruleset_generation() -> int | None:
    """The kernel's nftables generation (NFT_MSG_GETGEN): it moves on every committed transaction, by anyone.

    An unchanged generation proves that no table changed, so a no-op sync need not list its table. None
    when it cannot be read (then every sync lists its table).
    """
    request = struct.pack("=IHHII", 0, (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN, _NLM_F_REQUEST, 1, 0)
    request += struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # nfgenmsg: family, version, res_id
    request = struct.pack("=I", len(request)) + request[4:]
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
            sock.settimeout(2.0)
            sock.sendto(request, (0, 0))
            reply = sock.recv(65536)
    except OSError:
        return None
    length, kind = struct.unpack_from("=IH", reply)
    if kind != (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWGEN:
        return None
    offset = 16 + 4  # nlmsghdr, nfgenmsg
    while offset + 4 <= length:
        size, attribute = struct.unpack_from("=HH", reply, offset)
        if size < 4:
            break
        if attribute & 0x3FFF == _NFTA_GEN_ID:
            generation: int = struct.unpack_from("!I", reply, offset + 4)[0]
            return generation
        offset += (size + 3) & ~3
    return None


def table_family(p: plan_model.Plan) -> str:
    """The nftables family of a Plan's table: netdev for dsr, ip or ip6 (the VIP's) for nat."""
    if p.architecture is api.Architecture.dsr:
        return "netdev"
    return "ip6" if shared.is_ipv6(p.vip) else "ip"


@dataclass
class _Slot:
    """One entry of the effective endpoint list, before it becomes a Plan endpoint."""

    address: str
    port: int | None
    weight: int
    usable: bool


@dataclass
class _Loaded:
    """What this instance last loaded or adopted for one table: the digest and the kernel's listing."""

    family: str
    digest: str
    listing: str
    generation: int | None  # the ruleset generation at which `listing` was read


@dataclass
class Desired:
    """The ruleset a sync wants and the facts it was rendered from (for tests, logs and /config)."""

    family: str
    table: str
    draw: Callable[[str | None], str] = field(repr=False)  # renders the ruleset with a table comment
    digest: str
    effective: plan_model.Plan
    order: list[Key] = field(default_factory=list)  # dsr: the endpoints in hash-slot order
    device: str | None = None
    device_mac: str | None = None
    neighbours: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def ruleset(self) -> str:
        """The `nft -f` text to load, its digest in the table's comment (rendered only when needed)."""
        return self.draw(COMMENT_PREFIX + self.digest)


def _ip_json(*args: str) -> list[dict[str, object]]:
    done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    result = json.loads(done.stdout or "[]")
    assert isinstance(result, list)
    return result


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class NftablesEngine:
    """Programs `nat` and `dsr` Plans into nftables: desired state, one transaction, own tables only.

    `masquerade` (nat): backends see this node's address instead of the client's, for backends that do
    not route replies back through it. `device` (dsr): the interface instead of the route's.
    `drain_seconds` (dsr): how long a draining target keeps its hash slots. `forwarding` (nat): turn IP
    forwarding on. `strict_arp`: the speaker answers for the VIP, so the node must not. `nft` and `clock`
    are for tests.
    """

    def __init__(
        self,
        *,
        masquerade: bool = False,
        device: str | None = None,
        drain_seconds: float = DEFAULT_DRAIN_SECONDS,
        neighbour_timeout: float = DEFAULT_NEIGHBOUR_TIMEOUT,
        forwarding: bool = True,
        strict_arp: bool = False,
        nft: Nft | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.masquerade = masquerade
        self.strict_arp = strict_arp_module.StrictArp() if strict_arp else None
        self.device = device
        self.drain_seconds = drain_seconds
        self.neighbour_timeout = neighbour_timeout
        self.forwarding = forwarding
        self.nft = nft or default_nft()
        self.clock = clock
        self._loaded: dict[str, _Loaded] = {}
        self._layouts: dict[str, list[Key]] = {}  # dsr: the endpoint order last loaded, per table
        self._drain_since: dict[tuple[str, Key], float] = {}
        self._routes: dict[str, str] = {}  # backend address -> device
        self._macs: dict[str, str] = {}  # device -> its MAC
        self.unresolved: dict[str, set[str]] = {}  # per table: backends whose MAC did not resolve
        self._foreign: dict[str, bool] = {}  # VIP -> the node had it of its own (then it is not guarded)

    # --- the contract --------------------------------------------------------------------------------

    def sync(self, plan: plan_model.Plan, targets: Mapping[str, Sequence[Target]]) -> SyncReport:
        """Makes the kernel forward `plan` with `targets`' health and drain; loads nothing when it already does.

        `targets` are by backend name; a Plan endpoint without a target counts as usable. Raises
        ValueError for a Plan nftables cannot forward, NftError when nft refuses the ruleset.
        """
        started = time.perf_counter()
        desired = self.desired(plan, targets)
        changes = 0
        generation = ruleset_generation()
        known = self._loaded.get(desired.table)
        # Nothing was committed anywhere since this table was last verified: no need to list it.
        verified = (
            known is not None
            and generation is not None
            and known.generation == generation
            and (known.family, known.digest) == (desired.family, desired.digest)
        )
        if not verified:
            listing = self._list(desired.family, desired.table)
            if self._up_to_date(desired, listing):
                assert listing is not None
                self._loaded[desired.table] = _Loaded(desired.family, desired.digest, listing, generation)
            else:
                self._load(desired, generation)
                changes += 1
        if plan.architecture is api.Architecture.dsr:
            self._layouts[desired.table] = desired.order
        warnings: tuple[str, ...] = ()
        if self.strict_arp is not None and not shared.is_ipv6(plan.vip):  # before the VIP is there to answer
            checked = self.strict_arp.check()
            changes += checked.changes
            warnings = (checked.warning,) if checked.warning else ()
        changes += self._ensure_vip(plan.vip)
        if plan.architecture is api.Architecture.nat and self.forwarding:
            changes += self._ensure_forwarding(plan.vip)
        return SyncReport(changes=changes, seconds=time.perf_counter() - started, warnings=warnings)

    def remove(self, plan: plan_model.Plan) -> None:
        """Deletes this LoadBalancer's table (in whichever family it is) and the VIP address the engine added."""
        table = nftables_ruleset.nft_table_name(plan)
        families = self._families_holding(table)
        if families:
            self.nft.run("".join(f"delete table {family} {table}\n" for family in families))
        self._loaded.pop(table, None)
        self._layouts.pop(table, None)
        self.unresolved.pop(table, None)
        for key in [key for key in self._drain_since if key[0] == table]:
            del self._drain_since[key]
        self._remove_vip(plan.vip)

    def _load(self, desired: Desired, before: int | None) -> None:
        """One transaction: this table replaced (and dropped from other families, if the architecture changed)."""
        self.nft.run(self._stale_families(desired) + desired.ruleset)
        listing = self._list(desired.family, desired.table)
        if listing is None:
            raise NftError(f"table {desired.family} {desired.table} missing right after loading it")
        after = ruleset_generation()
        if before is not None and after == before + 1:
            # Only this transaction was committed meanwhile: the other tables verified before still are.
            for loaded in self._loaded.values():
                if loaded.generation == before:
                    loaded.generation = after
        self._loaded[desired.table] = _Loaded(desired.family, desired.digest, listing, after)
        log.info("loaded table %s %s (%s)", desired.family, desired.table, desired.digest[:12])

    # --- what a sync wants ---------------------------------------------------------------------------

    def desired(self, plan: plan_model.Plan, targets: Mapping[str, Sequence[Target]]) -> Desired:
        """The ruleset `sync` would load now (resolving DSR neighbours as needed), without loading it."""
        reason = nftables_ruleset.unsupported(plan)
        if reason is not None:
            raise ValueError(reason)
        table = nftables_ruleset.nft_table_name(plan)
        family = table_family(plan)
        backend = shared.serving_backend(plan)
        given = {(t.address, t.port): t for t in targets.get(backend.name, ())}
        if plan.architecture is api.Architecture.nat:
            endpoints = tuple(
                e
                if self._target_usable(given.get((e.address, e.port)))
                else e.model_copy(update={"weight": 0})
                for e in backend.endpoints
            )
            effective = _with_endpoints(plan, backend, endpoints)

            guard = self._guarded(plan.vip)

            def draw(comment: str | None) -> str:
                return nftables_ruleset.nftables(
                    effective, masquerade=self.masquerade, comment=comment, guard=guard
                )

            # The digest covers what nft loads; the comment that carries it needs a second render.
            return Desired(family, table, draw, ruleset_digest(draw(None)), effective)

        slots = self._dsr_slots(plan, table, backend, given)
        device = self._device(
            plan, [slot.address for slot in slots] or [e.address for e in backend.endpoints]
        )
        device_mac = self._device_mac(device)
        wanted = sorted({slot.address for slot in slots if slot.usable and slot.weight > 0})
        neighbours = self._neighbours(device, wanted) if wanted else {}
        missing = {address for address in wanted if address not in neighbours}
        if missing:
            log.warning("%s: no MAC for %s; treated as down", plan.key, ", ".join(sorted(missing)))
        self.unresolved[table] = missing
        for slot in slots:
            if slot.address in missing:
                slot.usable = False
        dsr_effective = _with_endpoints(plan, backend, _spread(slots))
        dsr_guard = self._guarded(plan.vip)

        def draw_dsr(comment: str | None) -> str:
            return nftables_ruleset.nftables(
                dsr_effective,
                device=device,
                device_mac=device_mac,
                neighbours=neighbours,
                comment=comment,
                guard=dsr_guard,
            )

        order = [(slot.address, slot.port) for slot in slots]
        digest = ruleset_digest(draw_dsr(None))
        return Desired(family, table, draw_dsr, digest, dsr_effective, order, device, device_mac, neighbours)

    def next_resync(self, plan: plan_model.Plan) -> float | None:
        """When (on `clock`) a DSR drain of this Plan ends and a sync should drop the drained target; or None."""
        table = nftables_ruleset.nft_table_name(plan)
        ends = [since + self.drain_seconds for (name, _), since in self._drain_since.items() if name == table]
        return min(ends) if ends else None

    def _guarded(self, vip: str) -> bool:
        """Whether the table guards the VIP (`nftables_ruleset.nft_guard_rules`): unless it is an address the
        node had of its own, whose other ports are the node's. Decided once per VIP: a sync asks no `ip`."""
        if vip not in self._foreign:
            self._foreign[vip] = addresses.is_foreign(vip)
            if self._foreign[vip]:
                log.warning("VIP %s is this node's own address: its other ports are not guarded", vip)
        return not self._foreign[vip]

    @staticmethod
    def _target_usable(target: Target | None) -> bool:
        return target is None or target.usable

    def _dsr_slots(
        self, plan: plan_model.Plan, table: str, backend: plan_model.Backend, given: Mapping[Key, Target]
    ) -> list[_Slot]:
        """The endpoints in hash-slot order, draining ones kept where they were until their drain ends."""
        now = self.clock()
        keep: dict[Key, Target] = {}
        for key, target in given.items():
            mark = (table, key)
            if not target.draining:
                self._drain_since.pop(mark, None)
                continue
            since = self._drain_since.setdefault(mark, now)
            if now - since < self.drain_seconds and target.health.healthy and target.weight > 0:
                keep[key] = target
        for mark in [m for m in self._drain_since if m[0] == table and m[1] not in given]:
            del self._drain_since[mark]  # no longer reported at all: its drain is over
        planned = [(e.address, e.port) for e in backend.endpoints]
        order = _merge_layout(planned, [k for k in keep if k not in planned], self._layouts.get(table, []))
        weights = {(e.address, e.port): e.weight for e in backend.endpoints}
        slots = []
        for key in order:
            if key in keep:
                slots.append(_Slot(key[0], key[1], weights.get(key, keep[key].weight), True))
            else:
                slots.append(_Slot(key[0], key[1], weights[key], self._target_usable(given.get(key))))
        return slots

    # --- the kernel's table --------------------------------------------------------------------------

    def _list(self, family: str, table: str) -> str | None:
        try:
            return self.nft.run(f"list table {family} {table}")
        except NftError as error:
            if "No such file or directory" in str(error):
                return None
            raise

    def _families_holding(self, table: str) -> list[str]:
        # One `list table` per family: `list tables` would fetch every table's rules (slow with many).
        return [family for family in ("ip", "ip6", "netdev") if self._list(family, table) is not None]

    def _up_to_date(self, desired: Desired, listing: str | None) -> bool:
        if listing is None:
            return False
        match = _COMMENT.search(listing)
        if match is None or match.group(1) != desired.digest:
            return False
        known = self._loaded.get(desired.table)
        if known is None or known.digest != desired.digest:
            return True  # adopt what a previous instance (or another replica's sync) loaded
        if known.listing != listing:
            log.warning("table %s %s was changed outside layerlb; reloading", desired.family, desired.table)
            return False
        return True

    def _stale_families(self, desired: Desired) -> str:
        """Deletes of this table in other families (the architecture changed), for the same transaction."""
        known = self._loaded.get(desired.table)
        if known is not None and known.family == desired.family:
            return ""
        families = [family for family in self._families_holding(desired.table) if family != desired.family]
        return "".join(f"delete table {family} {desired.table}\n" for family in families)

    # --- DSR addresses -------------------------------------------------------------------------------

    def _device(self, plan: plan_model.Plan, addresses: Iterable[str]) -> str:
        if self.device is not None:
            return self.device
        devices = set()
        for address in sorted(set(addresses)):
            if address not in self._routes:
                route = _ip_json("route", "get", address)[0]
                if route.get("gateway"):
                    raise ValueError(
                        f"{plan.key}: dsr needs backends on this node's L2 segment; {address} is reached "
                        f"via the gateway {route['gateway']}"
                    )
                self._routes[address] = str(route["dev"])
            devices.add(self._routes[address])
        if not devices:
            raise ValueError(
                f"{plan.key}: dsr has no backend to find the interface by; give the engine a device"
            )
        if len(devices) != 1:
            raise ValueError(
                f"{plan.key}: dsr needs all backends on one interface; they are on {sorted(devices)}"
            )
        return devices.pop()

    def _device_mac(self, device: str) -> str:
        if device not in self._macs:
            self._macs[device] = str(_ip_json("link", "show", "dev", device)[0]["address"])
        return self._macs[device]

    def _neighbours(self, device: str, addresses: Sequence[str]) -> dict[str, str]:
        """MACs of `addresses` on `device`: nudges each (so the kernel resolves or re-verifies it) and waits."""
        for address in addresses:
            _nudge(address)
        deadline = time.monotonic() + self.neighbour_timeout
        while True:
            found = _read_neighbours(device, addresses)
            if len(found) == len(addresses) or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    # --- the node ------------------------------------------------------------------------------------

    def _ensure_vip(self, vip: str) -> int:
        return 1 if addresses.add_to_loopback(vip) else 0

    def _remove_vip(self, vip: str) -> None:
        addresses.remove_from_loopback(vip)

    @staticmethod
    def _ensure_forwarding(vip: str) -> int:
        path = (
            "/proc/sys/net/ipv6/conf/all/forwarding"
            if shared.is_ipv6(vip)
            else "/proc/sys/net/ipv4/ip_forward"
        )
        with open(path) as file:
            if file.read().strip() == "1":
                return 0
        with open(path, "w") as file:
            file.write("1\n")
        return 1


# --- helpers -----------------------------------------------------------------------------------------


def _with_endpoints(
    p: plan_model.Plan, backend: plan_model.Backend, endpoints: tuple[plan_model.Endpoint, ...]
) -> plan_model.Plan:
    """`p` with the serving backend's endpoints replaced (the Plan is frozen; copies are cheap)."""
    changed = backend.model_copy(update={"endpoints": endpoints})
    backends = tuple(changed if b.name == backend.name else b for b in p.backends)
    return p.model_copy(update={"backends": backends})


def _merge_layout(planned: list[Key], kept: list[Key], previous: list[Key]) -> list[Key]:
    """The Plan's endpoints with kept (draining) ones re-inserted after the key they followed last time.

    This reproduces the previous hash-slot layout while a removed target drains; a kept key the previous
    layout does not know (a new instance) goes last.
    """
    if not kept:
        return list(planned)
    present = set(planned) | set(kept)
    after: dict[Key | None, list[Key]] = {}
    last: Key | None = None
    placed = set()
    for key in previous:
        if key in kept:
            after.setdefault(last, []).append(key)
            placed.add(key)
        if key in present:
            last = key
    order: list[Key] = []

    def add(key: Key | None) -> None:
        if key is not None:
            order.append(key)
        for follower in after.get(key, []):
            add(follower)

    add(None)
    for key in planned:
        add(key)
    order.extend(key for key in kept if key not in placed)
    return order


def _spread(slots: list[_Slot]) -> tuple[plan_model.Endpoint, ...]:
    """Plan endpoints from slots: a down slot's weight goes, one unit at a time, to usable ones in turn.

    The total weight stays the same, so `jhash mod total` maps every flow of a usable endpoint to the
    same entry as before. With no usable slot at all, every weight is 0 (the renderer writes no rule).
    """
    usable = [slot for slot in slots if slot.usable and slot.weight > 0]
    if not usable:
        return tuple(plan_model.Endpoint(address=s.address, port=s.port, weight=0) for s in slots)
    turns = _weighted_turns([(slot.address, slot.port, slot.weight) for slot in usable])
    cursor = 0
    endpoints = []
    for slot in slots:
        if slot.usable or slot.weight <= 0:
            endpoints.append(plan_model.Endpoint(address=slot.address, port=slot.port, weight=slot.weight))
            continue
        for _ in range(slot.weight):
            address, port = turns[cursor % len(turns)]
            cursor += 1
            endpoints.append(plan_model.Endpoint(address=address, port=port, weight=1))
    return tuple(endpoints)


def _weighted_turns(weighted: list[tuple[str, int | None, int]]) -> list[Key]:
    """Smooth weighted round-robin order (nginx's): each key appears `weight` times, evenly spread."""
    total = sum(weight for _, _, weight in weighted)
    current = [0] * len(weighted)
    turns: list[Key] = []
    for _ in range(total):
        for index, (_, _, weight) in enumerate(weighted):
            current[index] += weight
        best = max(range(len(weighted)), key=lambda i: current[i])
        current[best] -= total
        turns.append((weighted[best][0], weighted[best][1]))
    return turns


def _nudge(address: str) -> None:
    """One empty UDP datagram to the discard port: the kernel resolves (or re-verifies) the neighbour."""
    family = socket.AF_INET6 if shared.is_ipv6(address) else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(b"", (address, DISCARD_PORT))
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED):
                raise


def _read_neighbours(device: str, addresses: Sequence[str]) -> dict[str, str]:
    """Complete neighbour entries for `addresses` on `device` (IPv4 from /proc/net/arp, IPv6 from `ip`)."""
    wanted = set(addresses)
    found: dict[str, str] = {}
    if any(not shared.is_ipv6(address) for address in wanted):
        with open("/proc/net/arp") as file:
            for line in file.read().splitlines()[1:]:
                fields = line.split()
                complete = (
                    len(fields) >= 6 and int(fields[2], 16) & _ATF_COM and fields[3] != "00:00:00:00:00:00"
                )
                if complete and fields[0] in wanted and fields[5] == device:
                    found[fields[0]] = fields[3].lower()
    if any(shared.is_ipv6(address) for address in wanted):
        for entry in _ip_json("-6", "neigh", "show", "dev", device):
            state = entry.get("state") or []
            address = str(ipaddress.ip_address(str(entry.get("dst", "::"))))
            usable_state = isinstance(state, list) and not {"INCOMPLETE", "FAILED"} & set(state)
            if address in wanted and entry.get("lladdr") and usable_state:
                found[address] = str(entry["lladdr"]).lower()
    return found

"""Strict ARP on the node, so that a VIP on the loopback is answered by the L2 speaker alone.

**Why.** The host-network forwarding pods that put their VIP on the node's loopback (`nat` on either
engine, `dsr` on nftables, every kernel architecture while strict ARP is on, `transparent`) make it a
local address of the node. With Linux's default `arp_ignore=0` the kernel answers ARP for every local
address on every interface, so each node running a replica would answer for the VIP next to the speaker
that was elected to: two MACs for one VIP, and clients' caches flapping between them. With
`arp_announce=0` the node also puts the VIP as the sender address of its own ARP requests (for packets
sourced from it: IPVS NAT replies, the transparent proxy's answers), which re-points neighbours' caches at
it. kube-proxy's IPVS mode sets `net.ipv4.conf.all.arp_ignore=1` and `arp_announce=2` for the same reason
(`strictARP: true`), and MetalLB asks for it. With them the node answers ARP only for addresses of the
interface the request came in on (never the loopback) and sources its ARP requests from the outgoing
interface's own address.

**How**, in order, each step only when the one before did not settle it:

1. The kernel applies the larger of `all` and the interface's own value, for both knobs. If every
   interface but `lo` already ends up strict (`arp_ignore` 1, 2 or 8, `arp_announce` 2), nothing is
   written: a node its administrator configured, or one an earlier pod configured.
2. `net.ipv4.conf.all.arp_ignore=1`, `arp_announce=2` through /proc/sys, as kube-proxy does: it also
   covers interfaces created later. A value that is already strict is left (never lowered).
3. Container runtimes mount /proc/sys read-only in every non-privileged container (containerd, CRI-O,
   kind), and the forwarding pods are not privileged. The same settings then go to each interface's own
   configuration through rtnetlink (`RTM_SETLINK` with `IFLA_AF_SPEC` / `AF_INET` / `IFLA_INET_CONF`),
   which needs only the CAP_NET_ADMIN the pod already has to place the VIP. Interfaces created later are
   caught by the next check (the engines check at every sync, every few seconds).
4. Neither works (no CAP_NET_ADMIN, a kernel that refuses): `check` returns a warning naming the
   interfaces still answering and what the administrator must set; it is logged once per change, and the
   forwarding pod reports it to the operator, which shows it as the LoadBalancer's `StrictARP` condition
   (False, reason `NodeAnswersARP`) and a Warning Event. The pod keeps serving: traffic still flows, the
   VIP only flaps between MACs.

Nothing is ever set back: other VIPs on the node may rely on it, and `all` is shared (kube-proxy does
not undo it either).

**IPv6 needs nothing.** Linux answers a Neighbor Solicitation only for an address of the interface it
arrived on (`ndisc_recv_ns` looks the target up on that device), so a VIP on `lo` is never answered
from another interface; `tests/kernel/test_strict_arp_netns.py` checks it with `ndisc6`.

Values are read from /proc/sys (readable even where it is mounted read-only) of the calling thread's
network namespace; `proc` is for tests.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from layerlb_dataplane.kernel.ipvs import netlink

log = logging.getLogger("layerlb.kernel.strict_arp")

# Set to "1" by the operator on host-network forwarding pods (the speaker answers for their VIPs).
ENV: Final = "LAYERLB_STRICT_ARP"
PROC: Final = "/proc/sys/net/ipv4/conf"
ARP_IGNORE: Final = "arp_ignore"
ARP_ANNOUNCE: Final = "arp_announce"
WANTED: Final = {ARP_IGNORE: 1, ARP_ANNOUNCE: 2}
# arp_ignore: 1 (only addresses of the incoming interface), 2 (and in its subnet), 8 (never): all keep a
# loopback address unanswered; 0 and 3-7 answer it (3 only spares scope-host addresses).
STRICT_IGNORE: Final = frozenset({1, 2, 8})
NOT_INTERFACES: Final = frozenset({"all", "default", "lo"})

# rtnetlink (linux/rtnetlink.h, if_link.h, ip.h)
RTM_SETLINK: Final = 19
IFLA_AF_SPEC: Final = 26
IFLA_INET_CONF: Final = 1
DEVCONF: Final = {ARP_ANNOUNCE: 18, ARP_IGNORE: 19}  # IPV4_DEVCONF_ARP_ANNOUNCE, IPV4_DEVCONF_ARP_IGNORE
NLMSG_ERROR: Final = 2
_HEADER = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process enforces strict ARP (`LAYERLB_STRICT_ARP=1`, set by the operator)."""
    return (os.environ if environ is None else environ).get(ENV) == "1"


def is_strict(knob: str, value: int) -> bool:
    """Whether `value` of `knob` keeps a loopback address out of ARP."""
    return value in STRICT_IGNORE if knob == ARP_IGNORE else value == WANTED[knob]


@dataclass(frozen=True)
class Outcome:
    """What one check did: kernel writes made, and the warning when some interface still answers."""

    changes: int
    warning: str | None = None


InterfaceSetter = Callable[[str, Mapping[str, int]], None]


def set_interface(name: str, values: Mapping[str, int]) -> None:
    """Set IPv4 devconf `values` of interface `name` through rtnetlink; OSError when the kernel refuses."""
    conf = b"".join(netlink.attr(DEVCONF[knob], struct.pack("=I", value)) for knob, value in values.items())
    spec = netlink.nested(IFLA_AF_SPEC, netlink.nested(socket.AF_INET, netlink.nested(IFLA_INET_CONF, conf)))
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, socket.if_nametoindex(name), 0, 0) + spec
    message = _HEADER.pack(
        _HEADER.size + len(body), RTM_SETLINK, netlink.NLM_F_REQUEST | netlink.NLM_F_ACK, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.send(message + body)
        answer = sock.recv(65536)
    _, kind, _, _, _ = _HEADER.unpack_from(answer)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", answer, _HEADER.size)
        if code != 0:
            raise OSError(-code, f"{os.strerror(-code)} (setting {name}'s ARP configuration)")


def check(proc: str = PROC, set_interface: InterfaceSetter = set_interface) -> Outcome:
    """Make every interface but `lo` strict (see the module docstring); what was written, and a warning
    naming the interfaces left answering."""
    common = {knob: _read(proc, "all", knob) for knob in WANTED}
    interfaces = sorted(name for name in _interfaces(proc))

    def lax(name: str) -> dict[str, int]:
        """The knobs not strict on `name` (the kernel uses the larger of `all` and its own)."""
        found = {knob: max(common[knob], _read(proc, name, knob)) for knob in WANTED}
        return {knob: WANTED[knob] for knob, value in found.items() if not is_strict(knob, value)}

    if not any(lax(name) for name in interfaces):
        return Outcome(0)
    changes = 0
    failures: list[str] = []
    for knob, value in WANTED.items():
        if is_strict(knob, common[knob]):
            continue
        try:
            with open(f"{proc}/all/{knob}", "w") as file:
                file.write(f"{value}\n")
        except OSError as error:
            failures.append(f"net.ipv4.conf.all.{knob}: {error.strerror or error}")
            continue
        common[knob] = value
        changes += 1
    left: list[str] = []
    for name in interfaces:
        missing = lax(name)
        if not missing:
            continue
        try:
            set_interface(name, missing)
        except OSError as error:
            failures.append(f"{name}: {error.strerror or error}")
            left.append(name)
            continue
        changes += 1
    if not left:
        return Outcome(changes)
    return Outcome(
        changes,
        f"this node answers ARP for its loopback VIPs on {', '.join(left)} next to the L2 speaker (more than "
        f"one MAC for a VIP when several nodes run a replica): net.ipv4.conf.all.arp_ignore and arp_announce "
        f"could not be set ({'; '.join(failures)}); set net.ipv4.conf.all.arp_ignore=1 and "
        f"net.ipv4.conf.all.arp_announce=2 on the node",
    )


class StrictArp:
    """`check` for an engine or the transparent proxy, logging a warning once each time it changes."""

    def __init__(self, proc: str = PROC, set_interface: InterfaceSetter = set_interface) -> None:
        self.proc = proc
        self.set_interface = set_interface
        self.warning: str | None = None

    def check(self) -> Outcome:
        """Enforce strict ARP now (IPv4 VIPs only need it); the outcome, its warning logged if new."""
        outcome = check(self.proc, self.set_interface)
        if outcome.warning != self.warning:
            if outcome.warning is not None:
                log.warning("strict ARP: %s", outcome.warning)
            else:
                log.info("strict ARP: enforced")
        elif outcome.changes:
            log.info("strict ARP: %d setting(s) made", outcome.changes)
        self.warning = outcome.warning
        return outcome


def _interfaces(proc: str) -> list[str]:
    try:
        return [name for name in os.listdir(proc) if name not in NOT_INTERFACES]
    except OSError:
        return []


def _read(proc: str, interface: str, knob: str) -> int:
    """A knob's value (0, the kernel's default, when it cannot be read: an interface that just left)."""
    try:
        with open(f"{proc}/{interface}/{knob}") as file:
            return int(file.read().strip() or 0)
    except (OSError, ValueError):
        return 0

"""Transparent proxying: upstream sockets that carry the client's own source address.

Two halves, both needed (see docs/transparent-proxy.md):

- `bound_socket` opens the upstream socket with `IP_TRANSPARENT` (`IPV6_TRANSPARENT`), which lets it bind
  the client's address although the LB does not own it. The backend then sees the client as its peer.
- `setup_routing` makes the replies, addressed to the client, reach that socket instead of being
  forwarded or dropped: nftables marks packets for which a transparent local socket exists (the kernel's
  TPROXY recipe, `socket transparent 1`), and a policy rule sends marked packets to a routing table whose
  only route says "every address is local". Backends must route their replies through the LB.

Routing is applied with the `ip` and `nft` CLIs (iproute2, nftables); it needs CAP_NET_ADMIN in the
forwarding pod's network namespace and touches only layerlb's own table, rules and routes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
from typing import Any, Final

IP_TRANSPARENT: Final = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT: Final = getattr(socket, "IPV6_TRANSPARENT", 75)
NFT_TABLE: Final = "layerlb_tproxy"
_FAMILIES: Final = (("-4", "0.0.0.0/0"), ("-6", "::/0"))


class RoutingError(RuntimeError):
    """The namespace's routing could not be set up; the message holds the failing command's output."""


def bound_socket(source_ip: str, family: socket.AddressFamily) -> socket.socket:
    """A non-blocking TCP socket with IP_TRANSPARENT, bound to (source_ip, 0), ready to connect."""
    address = ipaddress.ip_address(source_ip.partition("%")[0])
    if family == socket.AF_INET and isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 client
    if family == socket.AF_INET6 and isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address(f"::ffff:{address}")
    if (family, address.version) not in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        raise ValueError(f"{source_ip} cannot be the source of an {family.name} socket")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind((str(address), 0))
    except BaseException:
        sock.close()
        raise
    return sock


def nft_ruleset(mark: int) -> str:
    """The nftables table, written so that loading it replaces any earlier version in one transaction.

    Prerouting at mangle priority (-150), before the routing decision: a packet for which a socket with
    IP_TRANSPARENT exists (the upstream connection's reply, SYN-ACK included) gets `mark` OR-ed in, which
    leaves other bits of the mark to whoever else uses them.
    """
    return (
        f"table inet {NFT_TABLE} {{}}\n"
        f"delete table inet {NFT_TABLE}\n"
        f"table inet {NFT_TABLE} {{\n"
        "  chain divert {\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        f"    meta l4proto {{ tcp, udp }} socket transparent 1 meta mark set meta mark | {mark:#x} accept\n"
        "  }\n"
        "}\n"
    )


def setup_routing(mark: int = 0x1, table: int = 100) -> None:
    """Policy routing so that backends' replies to client addresses are delivered to this process."""
    _check(mark, table)
    _run(["nft", "-f", "-"], stdin=nft_ruleset(mark))
    for flag, everything in _families():
        if not _has_rule(flag, mark, table):
            _run(["ip", flag, "rule", "add", "fwmark", f"{mark:#x}/{mark:#x}", "lookup", str(table)])
        _run(["ip", flag, "route", "replace", "local", everything, "dev", "lo", "table", str(table)])


def teardown_routing(mark: int = 0x1, table: int = 100) -> None:
    """Removes what `setup_routing` added (and nothing else), e.g. when a Plan leaves transparent mode."""
    _check(mark, table)
    if subprocess.run(["nft", "list", "table", "inet", NFT_TABLE], capture_output=True).returncode == 0:
        _run(["nft", "delete", "table", "inet", NFT_TABLE])
    for flag, everything in _families():
        while _has_rule(flag, mark, table):
            _run(["ip", flag, "rule", "del", "fwmark", f"{mark:#x}/{mark:#x}", "lookup", str(table)])
        with contextlib.suppress(RoutingError):  # absent already
            _run(["ip", flag, "route", "del", "local", everything, "dev", "lo", "table", str(table)])


def _check(mark: int, table: int) -> None:
    if not 0 < mark < 2**32:
        raise ValueError(f"mark {mark} is not a non-zero 32-bit value")
    if not 0 < table < 2**32 or table in (253, 254, 255):
        raise ValueError(f"table {table} is not a free routing table (1..2^32-1, not default/main/local)")


def _families() -> list[tuple[str, str]]:
    """IPv4 always; IPv6 only where the namespace has it (a kernel or pod may disable it)."""
    return [family for family in _FAMILIES if family[0] == "-4" or os.path.exists("/proc/net/if_inet6")]


def _has_rule(flag: str, mark: int, table: int) -> bool:
    rules: list[dict[str, Any]] = json.loads(_run(["ip", "-j", flag, "rule", "show"]) or "[]")
    for rule in rules:
        if str(rule.get("table")) != str(table) or "fwmark" not in rule:
            continue
        if int(str(rule["fwmark"]), 0) == mark and int(str(rule.get("fwmask", "0xffffffff")), 0) == mark:
            return True
    return False


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        raise RoutingError(f"{' '.join(argv)}: {error}") from error
    if done.returncode != 0:
        raise RoutingError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout

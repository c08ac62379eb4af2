"""The kernel's own listings of IPVS in /proc, parsed: `/proc/net/ip_vs` (services and real servers, with
weights, methods and connection counts) and `/proc/net/ip_vs_conn` (connection entries and their states).

Reading /proc costs no process and no netlink dump per service, which is why the engine takes the real
servers from here; IPv4 addresses are written as 8 hex digits, IPv6 ones in full, ports in hex.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Final

from layerlb_dataplane.kernel.ipvs import table

# IPVS connection states of TCP connections that are over (NONE: persistence templates, not connections).
FINISHED_STATES: Final = frozenset({"TIME_WAIT", "CLOSE", "NONE"})


def servers(
    text: str, vip: str | None = None
) -> dict[table.ServiceKey, dict[table.ServerKey, table.RealServer]]:
    """The real servers (with weights, methods and connection counts) of the TCP and UDP services in
    /proc/net/ip_vs, of `vip` or of every address, by service: the part of the table the netlink service
    dump does not carry."""
    prefixes = service_prefixes(vip) if vip is not None else ("TCP  ", "UDP  ")
    found: dict[table.ServiceKey, dict[table.ServerKey, table.RealServer]] = {}
    current: dict[table.ServerKey, table.RealServer] | None = None
    for line in text.splitlines():
        if line.startswith("  -> "):
            if current is None:
                continue
            words = line.split()
            if len(words) < 6:
                continue
            address, port = _proc_host_port(words[1])
            forward = table.FORWARD_FLAGS.get(words[2], words[2])
            current[(address, port)] = table.RealServer(
                address, port, forward, int(words[3]), int(words[4]), int(words[5])
            )
        elif line.startswith(prefixes):
            protocol, host_port = line.split(None, 2)[:2]
            address, port = _proc_host_port(host_port)
            current = found[table.ServiceKey(protocol, address, port)] = {}
        else:
            current = None  # a header, or a service of a kind layerlb does not own
    return found


@functools.lru_cache(maxsize=65536)
def _proc_address(text: str) -> str:
    """/proc/net/ip_vs and ip_vs_conn write IPv4 as 8 hex digits, IPv6 in colon form."""
    if len(text) == 8 and ":" not in text:
        return str(ipaddress.IPv4Address(int(text, 16)))
    return table.canonical(text.strip("[]"))


@functools.lru_cache(maxsize=65536)
def _proc_host_port(text: str) -> tuple[str, int]:
    """/proc/net/ip_vs's `0A000002:1F90` or `[2001:0db8:...:0005]:01BB` -> (address, port)."""
    host, _, port = text.rpartition(":")
    return _proc_address(host), int(port, 16)


def service_prefixes(vip: str) -> tuple[str, ...]:
    """How /proc/net/ip_vs starts the lines of TCP and UDP services on `vip` (IPv4 in hex, IPv6 in full)."""
    address = ipaddress.ip_address(vip)
    spelled = f"{int(address):08X}" if address.version == 4 else f"[{address.exploded}]"
    return (f"TCP  {spelled}:", f"UDP  {spelled}:")


def fingerprint(text: str, vip: str) -> tuple[str, ...]:
    """The lines of /proc/net/ip_vs about `vip`'s services and their real servers, connection counts
    left out: equal fingerprints mean nothing layerlb programs there changed in between (as far as /proc
    shows)."""
    prefixes = service_prefixes(vip)
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


def live_connections(text: str) -> set[table.ConnectionKey]:
    """(protocol, VIP, port, real server, port) of every IPVS connection entry that is not over, so a
    drained server can be deleted while IPVS still keeps its finished (TIME_WAIT) connections."""
    live: set[table.ConnectionKey] = set()
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) < 8 or words[7] in FINISHED_STATES:
            continue
        protocol, _, _, vaddr, vport, daddr, dport = words[:7]
        live.add((protocol, _proc_address(vaddr), int(vport, 16), _proc_address(daddr), int(dport, 16)))
    return live

"""The node's interfaces as the speaker needs them: which one holds an address, and whether it is up.

ioctls and /proc/net, not /sys/class/net: they answer for the network namespace of the calling process,
which is the node's even when /sys is the host's or mounted read-only (a hostNetwork pod).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCGIFADDR = 0x8915
IFF_UP = 0x1
IFF_RUNNING = 0x40  # operationally up: administratively up and carrier present


def _ifreq(name: str) -> bytes:
    return struct.pack("16s24x", name.encode()[:15])


def is_up(name: str) -> bool:
    """Whether interface `name` exists, is up and has carrier (a veth whose peer is down has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), SIOCGIFFLAGS, _ifreq(name))
        except OSError:
            return False
    (flags,) = struct.unpack_from("H", answer, 16)
    return bool(flags & IFF_UP and flags & IFF_RUNNING)


def _ipv4_of(name: str) -> ipaddress.IPv4Address | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, _ifreq(name))
        except OSError:
            return None
    return ipaddress.IPv4Address(answer[20:24])


def holding(address: str) -> str | None:
    """The interface that holds `address` (IPv4: its primary address; IPv6: any), or None."""
    wanted = ipaddress.ip_address(address)
    if isinstance(wanted, ipaddress.IPv4Address):
        for _, name in socket.if_nameindex():
            if _ipv4_of(name) == wanted:
                return name
        return None
    with contextlib.suppress(OSError), open("/proc/net/if_inet6", encoding="ascii") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 6 and ipaddress.IPv6Address(int(fields[0], 16)) == wanted:
                return fields[5]
    return None

"""ARP and NDP on the wire: parse the requests a speaker answers, build its replies and announcements.

Framed by hand with `struct` rather than with scapy, measured on this project's machine (Python 3.11):
importing scapy's l2 and inet6 layers takes 0.22 s and lifts a process's RSS from 20 MB to 45 MB (all of
`scapy.all`: 0.74 s, 73 MB), and one ARP request parsed and its reply built costs ~330 µs, so the 3,000
gratuitous ARPs of a 1,000-VIP takeover would take a second of CPU. The formats are fixed and small (RFC
826 ARP, RFC 4861 Neighbor Solicitation/Advertisement with a link-layer address option), and every
function here is tested on bytes, including against frames the kernel's own tools sent.

Frames are whole Ethernet frames as an AF_PACKET SOCK_RAW socket reads and writes them. Only Ethernet
with IPv4/IPv6 is handled; anything else parses to None, never an exception.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
UNSPECIFIED = ipaddress.IPv6Address("::")
ICMPV6 = 58
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136
SOURCE_LINK_LAYER_ADDRESS = 1
TARGET_LINK_LAYER_ADDRESS = 2
ARP_REQUEST, ARP_REPLY = 1, 2
MIN_FRAME = 60  # Ethernet's minimum without the FCS; short frames are padded, as NIC drivers expect

_ETHERNET = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_NA_FLAGS_SOLICITED = 0x40000000
_NA_FLAGS_OVERRIDE = 0x20000000


@dataclass(frozen=True)
class ArpRequest:
    """Who has `target`? Tell `sender_ip` at `sender_mac` (the reply goes to `sender_mac`)."""

    sender_mac: bytes
    sender_ip: ipaddress.IPv4Address
    target: ipaddress.IPv4Address


@dataclass(frozen=True)
class NeighborSolicitation:
    """Who has `target`? From `source` (:: while it checks its own address, DAD), reply to `reply_mac`."""

    reply_mac: bytes
    source: ipaddress.IPv6Address
    target: ipaddress.IPv6Address


def mac_text(mac: bytes) -> str:
    """02:00:00:00:00:01 for six bytes."""
    return ":".join(f"{byte:02x}" for byte in mac)


def parse_mac(text: str) -> bytes:
    """Six bytes from 02:00:00:00:00:01; ValueError otherwise."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(part) == 2 for part in parts):
        raise ValueError(f"{text!r} is not a MAC address like 02:00:00:00:00:01")
    return bytes(int(part, 16) for part in parts)


def _pad(frame: bytes) -> bytes:
    return frame + b"\x00" * (MIN_FRAME - len(frame)) if len(frame) < MIN_FRAME else frame


def parse_arp_request(frame: bytes) -> ArpRequest | None:
    """The ARP request (Ethernet/IPv4) in `frame`, or None for anything else, including replies."""
    if len(frame) < _ETHERNET.size + _ARP.size:
        return None
    _, _, ethertype = _ETHERNET.unpack_from(frame)
    if ethertype != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, _, tpa = _ARP.unpack_from(frame, _ETHERNET.size)
    if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, ARP_REQUEST):
        return None
    return ArpRequest(sha, ipaddress.IPv4Address(spa), ipaddress.IPv4Address(tpa))


def arp_reply(request: ArpRequest, mac: bytes) -> bytes:
    """The unicast reply telling the asker that `request.target` is at `mac`."""
    header = _ETHERNET.pack(request.sender_mac, mac, ETH_P_ARP)
    body = _ARP.pack(
        1, ETH_P_IP, 6, 4, ARP_REPLY, mac, request.target.packed, request.sender_mac, request.sender_ip.packed
    )
    return _pad(header + body)


def gratuitous_arp(vip: ipaddress.IPv4Address, mac: bytes) -> bytes:
    """A broadcast ARP announcement (RFC 5227: a request with sender = target = `vip`) from `mac`.

    Linux treats it as gratuitous and overrides an existing neighbour entry at once, ignoring `locktime`;
    the request form is also the one every stack accepts (some ignore unsolicited replies).
    """
    header = _ETHERNET.pack(BROADCAST, mac, ETH_P_ARP)
    body = _ARP.pack(1, ETH_P_IP, 6, 4, ARP_REQUEST, mac, vip.packed, b"\x00" * 6, vip.packed)
    return _pad(header + body)


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def icmpv6_checksum(source: ipaddress.IPv6Address, destination: ipaddress.IPv6Address, message: bytes) -> int:
    """The ICMPv6 checksum of `message` (its checksum field zero) over the IPv6 pseudo-header (RFC 8200)."""
    pseudo = source.packed + destination.packed + struct.pack("!I3xB", len(message), ICMPV6)
    return ~_sum16(pseudo + message) & 0xFFFF


def solicited_node_address(address: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX, where Neighbor Solicitations for `address` are sent."""
    return ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + address.packed[13:])


def multicast_mac(address: ipaddress.IPv6Address) -> bytes:
    """The Ethernet address of an IPv6 multicast group: 33:33 and its last four bytes (RFC 2464)."""
    return b"\x33\x33" + address.packed[12:]


def parse_neighbor_solicitation(frame: bytes) -> NeighborSolicitation | None:
    """The Neighbor Solicitation in `frame` (checked as RFC 4861 §7.1.1 asks), or None for anything else."""
    start = _ETHERNET.size
    if len(frame) < start + _IPV6.size + 24:
        return None
    _, ether_source, ethertype = _ETHERNET.unpack_from(frame)
    if ethertype != ETH_P_IPV6:
        return None
    first, length, next_header, hop_limit, source_bytes, destination_bytes = _IPV6.unpack_from(frame, start)
    if first >> 28 != 6 or next_header != ICMPV6 or hop_limit != 255:
        return None
    message = frame[start + _IPV6.size : start + _IPV6.size + length]
    if len(message) != length or length < 24 or message[0] != NEIGHBOR_SOLICITATION or message[1] != 0:
        return None
    source = ipaddress.IPv6Address(source_bytes)
    destination = ipaddress.IPv6Address(destination_bytes)
    if (
        icmpv6_checksum(source, destination, message[:2] + b"\x00\x00" + message[4:])
        != struct.unpack_from("!H", message, 2)[0]
    ):
        return None
    target = ipaddress.IPv6Address(message[8:24])
    if target.is_multicast:
        return None
    reply_mac = ether_source
    offset = 24
    while offset + 2 <= len(message):
        kind, units = message[offset], message[offset + 1]
        if units == 0:
            return None  # a zero-length option is invalid and would loop forever
        if kind == SOURCE_LINK_LAYER_ADDRESS and units == 1:
            if source == UNSPECIFIED:
                return None  # DAD probes carry no link-layer address (§7.1.1)
            reply_mac = message[offset + 2 : offset + 8]
        offset += units * 8
    return NeighborSolicitation(reply_mac, source, target)


def _advertisement(
    destination_mac: bytes,
    source_mac: bytes,
    target: ipaddress.IPv6Address,
    destination: ipaddress.IPv6Address,
    flags: int,
) -> bytes:
    without_sum = struct.pack(
        "!BBHI16sBB6s", NEIGHBOR_ADVERTISEMENT, 0, 0, flags, target.packed, 2, 1, source_mac
    )
    checksum = icmpv6_checksum(target, destination, without_sum)
    message = without_sum[:2] + struct.pack("!H", checksum) + without_sum[4:]
    ip = _IPV6.pack(6 << 28, len(message), ICMPV6, 255, target.packed, destination.packed)
    return _pad(_ETHERNET.pack(destination_mac, source_mac, ETH_P_IPV6) + ip + message)


def neighbor_advertisement(solicitation: NeighborSolicitation, mac: bytes) -> bytes:
    """The solicited Advertisement (S and O set) telling the asker that the target is at `mac`.

    A DAD probe (source ::) is answered to all-nodes without S, as RFC 4861 §7.2.4 says: the VIP is taken.
    """
    if solicitation.source == UNSPECIFIED:
        return _advertisement(
            multicast_mac(ALL_NODES), mac, solicitation.target, ALL_NODES, _NA_FLAGS_OVERRIDE
        )
    return _advertisement(
        solicitation.reply_mac,
        mac,
        solicitation.target,
        solicitation.source,
        _NA_FLAGS_SOLICITED | _NA_FLAGS_OVERRIDE,
    )


def unsolicited_neighbor_advertisement(vip: ipaddress.IPv6Address, mac: bytes) -> bytes:
    """An unsolicited Advertisement to all-nodes with O set (RFC 4861 §7.2.6): caches move to `mac` at once."""
    return _advertisement(multicast_mac(ALL_NODES), mac, vip, ALL_NODES, _NA_FLAGS_OVERRIDE)

"""Answering ARP and NDP for the VIPs this node holds, on AF_PACKET sockets, one pair per interface.

Each selected interface gets two packet sockets bound to it: one for ARP (a classic BPF filter passes
requests only) and one for IPv6 (the filter passes ICMPv6 Neighbor Solicitations only, so the rest of the
node's IPv6 traffic is never copied to us). They are read by the asyncio loop (`add_reader`) and answered
in place; only VIPs in the interface's current set are answered, so releasing a VIP is one set update.

Solicitations for a VIP go to its solicited-node multicast group, which a NIC drops unless told to keep
it: for every held IPv6 VIP the IPv6 socket adds that group's MAC to the interface (PACKET_ADD_MEMBERSHIP,
dropped with the socket), instead of joining the group through an address the node does not own.

On takeover, `announce` sends gratuitous ARP / unsolicited NA so LAN caches move at once instead of at
their next expiry. An interface that is missing or down is an error for its VIPs only; sends to a down
link are dropped silently, and `runtime` reopens a missing interface on its retry timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable

from layerlb_speaker import framing
from layerlb_speaker.announcement import Address

log = logging.getLogger("layerlb.speaker")

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_DROP_MEMBERSHIP = 1, 2
PACKET_MR_MULTICAST = 0
PACKET_OTHERHOST, PACKET_OUTGOING = 3, 4
SO_ATTACH_FILTER = 26


def _bpf(*instructions: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("HBBI", *instruction) for instruction in instructions)


_LDB, _LDH, _JEQ, _RET = 0x30, 0x28, 0x15, 0x06
# Frame offsets: ARP opcode at 20; IPv6 next header at 20, ICMPv6 type at 54 (no extension headers, as
# RFC 4861 messages never carry one).
ARP_REQUESTS = _bpf(
    (_LDH, 0, 0, 20), (_JEQ, 0, 1, framing.ARP_REQUEST), (_RET, 0, 0, 0x40000), (_RET, 0, 0, 0)
)
NEIGHBOR_SOLICITATIONS = _bpf(
    (_LDB, 0, 0, 20),
    (_JEQ, 0, 3, framing.ICMPV6),
    (_LDB, 0, 0, 54),
    (_JEQ, 0, 1, framing.NEIGHBOR_SOLICITATION),
    (_RET, 0, 0, 0x40000),
    (_RET, 0, 0, 0),
)


def _attach(sock: socket.socket, program: bytes) -> None:
    code = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _packet_socket(interface: str, protocol: int, program: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
    try:
        _attach(sock, program)
        sock.bind((interface, protocol))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class InterfaceResponder:
    """ARP and NDP answers on one interface for the VIPs in `ipv4` and `ipv6`.

    Opening raises OSError when the interface is missing (ENODEV) or we lack CAP_NET_RAW (EPERM).
    """

    def __init__(self, interface: str, loop: asyncio.AbstractEventLoop) -> None:
        self.interface = interface
        self.loop = loop
        self.ipv4: set[ipaddress.IPv4Address] = set()
        self.ipv6: set[ipaddress.IPv6Address] = set()
        self.answered = 0
        self._groups: set[bytes] = set()
        self._arp = _packet_socket(interface, framing.ETH_P_ARP, ARP_REQUESTS)
        try:
            self._nd = _packet_socket(interface, framing.ETH_P_IPV6, NEIGHBOR_SOLICITATIONS)
        except BaseException:
            self._arp.close()
            raise
        self.mac: bytes = self._arp.getsockname()[4]
        self._ifindex = socket.if_nametoindex(interface)
        loop.add_reader(self._arp.fileno(), self._read, self._arp)
        loop.add_reader(self._nd.fileno(), self._read, self._nd)

    def hold(self, vips: Iterable[Address]) -> None:
        """Answers for exactly `vips` from now on (and keeps their solicited-node groups)."""
        self.ipv4 = {vip for vip in vips if isinstance(vip, ipaddress.IPv4Address)}
        self.ipv6 = {vip for vip in vips if isinstance(vip, ipaddress.IPv6Address)}
        groups = {framing.multicast_mac(framing.solicited_node_address(vip)) for vip in self.ipv6}
        for mac in groups - self._groups:
            self._membership(PACKET_ADD_MEMBERSHIP, mac)
        for mac in self._groups - groups:
            self._membership(PACKET_DROP_MEMBERSHIP, mac)
        self._groups = groups

    def _membership(self, action: int, mac: bytes) -> None:
        request = struct.pack("iHH8s", self._ifindex, PACKET_MR_MULTICAST, 6, mac)
        try:
            self._nd.setsockopt(SOL_PACKET, action, request)
        except OSError as error:
            log.warning("%s: multicast group %s: %s", self.interface, framing.mac_text(mac), error)

    def _read(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded, so a flood cannot starve the heartbeats
            try:
                frame, address = sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError as error:  # ENETDOWN when the link goes down: nothing to read until it is up
                log.debug("%s: %s", self.interface, error)
                return
            if address[2] in (PACKET_OTHERHOST, PACKET_OUTGOING):
                continue
            reply = self._reply(frame)
            if reply is not None:
                self.send(reply)
                self.answered += 1

    def _reply(self, frame: bytes) -> bytes | None:
        if sock_is_arp(frame):
            request = framing.parse_arp_request(frame)
            if request is not None and request.target in self.ipv4 and request.sender_ip != request.target:
                return framing.arp_reply(request, self.mac)
            return None
        solicitation = framing.parse_neighbor_solicitation(frame)
        if solicitation is not None and solicitation.target in self.ipv6:
            return framing.neighbor_advertisement(solicitation, self.mac)
        return None

    def send(self, frame: bytes) -> None:
        """Sends one frame; a down link or a full queue loses it (the next announcement or request retries)."""
        sock = self._arp if sock_is_arp(frame) else self._nd
        with contextlib.suppress(OSError):
            sock.send(frame)

    def announce(self, vip: Address) -> None:
        """One gratuitous ARP or unsolicited NA for `vip` from this interface's MAC."""
        if isinstance(vip, ipaddress.IPv4Address):
            self.send(framing.gratuitous_arp(vip, self.mac))
        else:
            self.send(framing.unsolicited_neighbor_advertisement(vip, self.mac))

    def close(self) -> None:
        """Stops answering; closing the IPv6 socket also drops its multicast groups."""
        for sock in (self._arp, self._nd):
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock.fileno())
            sock.close()


def sock_is_arp(frame: bytes) -> bool:
    """Whether an Ethernet frame carries ARP."""
    return len(frame) >= 14 and frame[12:14] == b"\x08\x06"

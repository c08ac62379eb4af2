"""ARP and NDP on bytes: requests the kernel's tools send parse, replies and announcements are well formed."""

from __future__ import annotations

import ipaddress
import struct

from layerlb_speaker import framing

MAC = framing.parse_mac("02:00:00:00:00:02")
ASKER = framing.parse_mac("02:00:00:00:00:01")
VIP4 = ipaddress.IPv4Address("192.0.2.10")
VIP6 = ipaddress.IPv6Address("2001:db8::10")
ASKER6 = ipaddress.IPv6Address("2001:db8::1")

# arping 2.23 -i eth0 192.0.2.10 from 192.0.2.1, as tcpdump -xx shows it (padded to 60 bytes).
ARPING_REQUEST = bytes.fromhex(
    "ffffffffffff020000000001080600010800060400010200000000 01c0000201000000000000c000020a".replace(" ", "")
) + bytes(18)


def ns_frame(
    source: ipaddress.IPv6Address = ASKER6, option: bytes | None = None, hop_limit: int = 255
) -> bytes:
    """A Neighbor Solicitation for VIP6 as the Linux kernel sends it (to the solicited-node group)."""
    destination = framing.solicited_node_address(VIP6)
    if option is None:
        option = bytes([1, 1]) + ASKER
    body = struct.pack("!BBHI16s", 135, 0, 0, 0, VIP6.packed) + option
    checksum = framing.icmpv6_checksum(source, destination, body)
    body = body[:2] + struct.pack("!H", checksum) + body[4:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(body), 58, hop_limit, source.packed, destination.packed)
    return framing.multicast_mac(destination) + ASKER + b"\x86\xdd" + ip + body


def test_an_arping_request_parses_and_its_reply_is_an_arp_reply_to_the_asker() -> None:
    request = framing.parse_arp_request(ARPING_REQUEST)
    assert request == framing.ArpRequest(ASKER, ipaddress.IPv4Address("192.0.2.1"), VIP4)
    reply = framing.arp_reply(request, MAC)
    assert len(reply) == 60
    assert reply[:14] == ASKER + MAC + b"\x08\x06"
    assert reply[14:42] == bytes.fromhex("0001080006040002") + MAC + VIP4.packed + ASKER + bytes(
        [192, 0, 2, 1]
    )


def test_replies_and_non_arp_frames_are_not_requests() -> None:
    reply = framing.arp_reply(framing.parse_arp_request(ARPING_REQUEST), MAC)  # type: ignore[arg-type]
    assert framing.parse_arp_request(reply) is None
    assert framing.parse_arp_request(ns_frame()) is None
    assert framing.parse_arp_request(ARPING_REQUEST[:30]) is None


def test_a_gratuitous_arp_is_a_broadcast_request_for_the_vip_by_the_vip() -> None:
    frame = framing.gratuitous_arp(VIP4, MAC)
    assert frame[:14] == framing.BROADCAST + MAC + b"\x08\x06"
    assert frame[14:42] == bytes.fromhex("0001080006040001") + MAC + VIP4.packed + bytes(6) + VIP4.packed


def test_a_kernel_neighbor_solicitation_parses_with_its_link_layer_address() -> None:
    assert framing.parse_neighbor_solicitation(ns_frame()) == framing.NeighborSolicitation(
        ASKER, ASKER6, VIP6
    )


def test_malformed_solicitations_are_ignored() -> None:
    assert framing.parse_neighbor_solicitation(ns_frame(hop_limit=64)) is None  # routed from afar
    bad_sum = bytearray(ns_frame())
    bad_sum[-1] ^= 0xFF
    assert framing.parse_neighbor_solicitation(bytes(bad_sum)) is None
    assert (
        framing.parse_neighbor_solicitation(ns_frame(option=bytes([1, 0]) + bytes(6))) is None
    )  # zero length
    assert framing.parse_neighbor_solicitation(ns_frame()[:70]) is None
    assert framing.parse_neighbor_solicitation(ARPING_REQUEST) is None


def _advertisement_parts(
    frame: bytes,
) -> tuple[bytes, ipaddress.IPv6Address, ipaddress.IPv6Address, int, bytes]:
    source, destination = ipaddress.IPv6Address(frame[22:38]), ipaddress.IPv6Address(frame[38:54])
    message = frame[54 : 54 + struct.unpack_from("!H", frame, 18)[0]]
    assert frame[20] == 58 and frame[21] == 255
    assert message[0] == 136
    zeroed = message[:2] + b"\x00\x00" + message[4:]
    assert framing.icmpv6_checksum(source, destination, zeroed) == struct.unpack_from("!H", message, 2)[0]
    assert message[8:24] == VIP6.packed
    assert message[24:32] == bytes([2, 1]) + MAC  # target link-layer address option
    return frame[:6], source, destination, struct.unpack_from("!I", message, 4)[0] >> 29, frame[6:12]


def test_the_advertisement_answers_the_asker_with_solicited_and_override() -> None:
    solicitation = framing.parse_neighbor_solicitation(ns_frame())
    assert solicitation is not None
    to, source, destination, flags, sender = _advertisement_parts(
        framing.neighbor_advertisement(solicitation, MAC)
    )
    assert (to, source, destination, sender) == (ASKER, VIP6, ASKER6, MAC)
    assert flags == 0b011  # R=0, S=1, O=1


def test_a_duplicate_address_probe_is_answered_to_all_nodes_without_solicited() -> None:
    probe = framing.parse_neighbor_solicitation(ns_frame(source=framing.UNSPECIFIED, option=b""))
    assert probe is not None
    to, _, destination, flags, _ = _advertisement_parts(framing.neighbor_advertisement(probe, MAC))
    assert (to, destination, flags) == (bytes.fromhex("333300000001"), framing.ALL_NODES, 0b001)


def test_an_unsolicited_advertisement_goes_to_all_nodes_with_override() -> None:
    to, source, destination, flags, _ = _advertisement_parts(
        framing.unsolicited_neighbor_advertisement(VIP6, MAC)
    )
    assert (to, source, destination, flags) == (bytes.fromhex("333300000001"), VIP6, framing.ALL_NODES, 0b001)


def test_solicited_node_group_and_its_mac() -> None:
    group = framing.solicited_node_address(ipaddress.IPv6Address("2001:db8::12:3456"))
    assert group == ipaddress.IPv6Address("ff02::1:ff12:3456")
    assert framing.multicast_mac(group) == bytes.fromhex("3333ff123456")

"""The IPVS engine's netlink messages, byte by byte, and its /proc reader: the layer the guest tests
drive with a real kernel, checked here field by field (no IPVS needed) so a wrong attribute fails with
its name rather than as a refused sync in the guest."""

from __future__ import annotations

import socket
import struct

import pytest
from layerlb_dataplane.kernel.ipvs import engine, kernel, netlink, proc, table

KEY = table.ServiceKey("TCP", "10.0.100.1", 80)
KEY6 = table.ServiceKey("UDP", "2001:db8::1", 53)


def service_fields(body: bytes) -> dict[int, bytes]:
    top = netlink.parse_attrs(body, 0, len(body))
    nested = top[netlink.CMD_ATTR_SERVICE]
    return {kind: bytes(value) for kind, value in netlink.parse_attrs(nested, 0, len(nested)).items()}


def dest_fields(body: bytes) -> dict[int, bytes]:
    top = netlink.parse_attrs(body, 0, len(body))
    nested = top[netlink.CMD_ATTR_DEST]
    return {kind: bytes(value) for kind, value in netlink.parse_attrs(nested, 0, len(nested)).items()}


def test_adding_a_persistent_service_with_a_scheduler_flag() -> None:
    service = table.VirtualService(KEY, "mh", 600, "mh-fallback")
    request = kernel.request(table.Change("-A", KEY, service))
    assert request.command == netlink.CMD_NEW_SERVICE
    fields = service_fields(request.body)
    assert fields[netlink.SVC_AF] == struct.pack("=H", socket.AF_INET)
    assert fields[netlink.SVC_PROTOCOL] == struct.pack("=H", socket.IPPROTO_TCP)
    assert fields[netlink.SVC_ADDR] == socket.inet_aton("10.0.100.1") + b"\0" * 12
    assert fields[netlink.SVC_PORT] == b"\x00\x50"  # network order
    assert fields[netlink.SVC_SCHED_NAME] == b"mh\0"
    flags, mask = struct.unpack("=II", fields[netlink.SVC_FLAGS])
    assert (flags, mask) == (netlink.F_PERSISTENT | netlink.F_SCHED1, 0xFFFFFFFF)
    assert fields[netlink.SVC_TIMEOUT] == struct.pack("=I", 600)
    assert fields[netlink.SVC_NETMASK] == b"\xff\xff\xff\xff"


def test_an_ipv6_service_without_persistence() -> None:
    service = table.VirtualService(KEY6, "rr", None)
    request = kernel.request(table.Change("-E", KEY6, service))
    assert request.command == netlink.CMD_SET_SERVICE
    fields = service_fields(request.body)
    assert fields[netlink.SVC_AF] == struct.pack("=H", socket.AF_INET6)
    assert fields[netlink.SVC_PROTOCOL] == struct.pack("=H", socket.IPPROTO_UDP)
    assert fields[netlink.SVC_ADDR] == socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert struct.unpack("=II", fields[netlink.SVC_FLAGS]) == (0, 0xFFFFFFFF)
    assert fields[netlink.SVC_TIMEOUT] == struct.pack("=I", 0)
    assert fields[netlink.SVC_NETMASK] == struct.pack("=I", 128)  # a prefix length for IPv6


def test_deleting_a_service_names_it_only() -> None:
    request = kernel.request(table.Change("-D", KEY))
    assert request.command == netlink.CMD_DEL_SERVICE
    assert set(service_fields(request.body)) == {
        netlink.SVC_AF,
        netlink.SVC_PROTOCOL,
        netlink.SVC_ADDR,
        netlink.SVC_PORT,
    }


@pytest.mark.parametrize(("forward", "method"), [("-m", 0), ("-i", 2), ("-g", 3)])
def test_real_servers_with_each_forwarding_method(forward: str, method: int) -> None:
    server = table.RealServer("10.0.2.11", 8080, forward, 3)
    request = kernel.request(table.Change("-a", KEY, server=server))
    assert request.command == netlink.CMD_NEW_DEST
    assert service_fields(request.body)[netlink.SVC_PORT] == b"\x00\x50"
    fields = dest_fields(request.body)
    assert fields[netlink.DEST_ADDR] == socket.inet_aton("10.0.2.11") + b"\0" * 12
    assert fields[netlink.DEST_PORT] == struct.pack("!H", 8080)
    assert fields[netlink.DEST_ADDR_FAMILY] == struct.pack("=H", socket.AF_INET)
    assert fields[netlink.DEST_FWD_METHOD] == struct.pack("=I", method)
    assert fields[netlink.DEST_WEIGHT] == struct.pack("=I", 3)
    assert fields[netlink.DEST_U_THRESH] == fields[netlink.DEST_L_THRESH] == struct.pack("=I", 0)
    edit = kernel.request(table.Change("-e", KEY, server=server))
    assert (edit.command, edit.body) == (netlink.CMD_SET_DEST, request.body)
    delete = kernel.request(table.Change("-d", KEY, server=server))
    assert delete.command == netlink.CMD_DEL_DEST
    assert set(dest_fields(delete.body)) == {netlink.DEST_ADDR, netlink.DEST_PORT, netlink.DEST_ADDR_FAMILY}


def test_changes_read_as_ipvsadm_lines() -> None:
    server = table.RealServer("10.0.2.11", 8080, "-g", 2)
    assert str(table.Change("-A", KEY, table.VirtualService(KEY, "sh", 30, "sh-fallback"))) == (
        "-A -t 10.0.100.1:80 -s sh -b sh-fallback -p 30"
    )
    assert str(table.Change("-a", KEY, server=server)) == "-a -t 10.0.100.1:80 -r 10.0.2.11:8080 -g -w 2"
    assert str(table.Change("-d", KEY, server=server)) == "-d -t 10.0.100.1:80 -r 10.0.2.11:8080"
    assert str(table.Change("-D", KEY6)) == "-D -u [2001:db8::1]:53"


def test_scheduler_flags_by_name() -> None:
    assert netlink.scheduler_flag_bits("sh", "sh-fallback,sh-port") == netlink.F_SCHED1 | netlink.F_SCHED2
    assert netlink.scheduler_flag_bits("wlc", "flag-3") == netlink.F_SCHED3
    assert netlink.scheduler_flag_bits("rr", None) == 0
    assert netlink.scheduler_flag_names("mh", netlink.F_SCHED1 | netlink.F_HASHED) == "mh-fallback"
    assert netlink.scheduler_flag_names("rr", netlink.F_HASHED | netlink.F_PERSISTENT) is None
    with pytest.raises(ValueError, match="scheduler rr has no flag 'sh-port'"):
        netlink.scheduler_flag_bits("rr", "sh-port")


def dump_message(*fields: bytes) -> bytes:
    """A service dump answer as the kernel frames it: netlink header, generic header, nested service."""
    body = netlink.GENL.pack(netlink.CMD_NEW_SERVICE, 1, 0) + netlink.nested(
        netlink.CMD_ATTR_SERVICE, *fields
    )
    return netlink.HEADER.pack(netlink.HEADER.size + len(body), 32, 2, 7, 0) + body


def test_a_service_of_the_dump_in_the_engines_terms() -> None:
    identity = netlink.service_identity("TCP", "10.0.100.1", 80)
    stats = netlink.nested(10, netlink.attr(1, struct.pack("=I", 5)))  # counters the reader skips
    flags = netlink.F_PERSISTENT | netlink.F_HASHED | netlink.F_SCHED1 | netlink.F_ONEPACKET
    mask = socket.inet_aton("255.255.255.0")
    data = dump_message(identity, netlink.service_settings("sh", flags, 300, mask), stats)
    data += dump_message(
        netlink.attr(netlink.SVC_AF, struct.pack("=H", socket.AF_INET)),
        netlink.attr(netlink.SVC_FWMARK, struct.pack("=I", 7)),
    )
    parsed = list(netlink.messages(data))
    assert [(kind, sequence) for kind, sequence, _, _ in parsed] == [(32, 7), (32, 7)]
    entries = [
        netlink.parse_service(memoryview(data)[start + netlink.GENL.size : end])
        for _, _, start, end in parsed
    ]
    first, fwmark = entries
    assert first is not None and fwmark is not None
    assert (first.protocol, first.address, first.port, first.scheduler, first.timeout) == (
        "TCP",
        "10.0.100.1",
        80,
        "sh",
        300,
    )
    assert fwmark.fwmark == 7 and fwmark.address == ""
    service = kernel.service_from_entry(first)
    assert service.settings == ("sh", "sh-fallback", 300, ("ops", "mask", "ffffff00"))


def test_the_proc_listing_gives_the_real_servers_of_a_vip() -> None:
    listing = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A006401:0050 wrr
  -> 0A00020C:1F90      Route   0      2          5
  -> 0A00020B:1F90      Masq    3      0          0
UDP  0A006401:0035 sh
TCP  [2001:0db8:0000:0000:0000:0000:0000:0001]:01BB rr
  -> [2001:0db8:0000:0000:0000:0000:0000:0005]:01BB      Tunnel  1      0          0
TCP  0A006402:0050 rr
  -> 0A00020B:1F90      Local   1      0          0
FWM  00000005 rr
  -> 0A00020D:0000      Route   1      0          0
"""
    servers = proc.servers(listing, "10.0.100.1")
    assert set(servers) == {
        table.ServiceKey("TCP", "10.0.100.1", 80),
        table.ServiceKey("UDP", "10.0.100.1", 53),
    }
    tcp = servers[table.ServiceKey("TCP", "10.0.100.1", 80)]
    assert tcp[("10.0.2.12", 8080)] == table.RealServer("10.0.2.12", 8080, "-g", 0, 2, 5)
    assert tcp[("10.0.2.11", 8080)] == table.RealServer("10.0.2.11", 8080, "-m", 3, 0, 0)
    assert servers[table.ServiceKey("UDP", "10.0.100.1", 53)] == {}
    v6 = proc.servers(listing, "2001:db8::1")[table.ServiceKey("TCP", "2001:db8::1", 443)]
    assert v6[("2001:db8::5", 443)].forward == "-i"
    every = proc.servers(listing)
    assert len(every) == 4  # the fwmark service and its server are not layerlb's kind
    assert every[table.ServiceKey("TCP", "10.0.100.2", 80)][("10.0.2.11", 8080)].forward == table.LOCAL


def test_without_ipvs_in_the_kernel_the_error_says_so() -> None:
    """This machine's kernel has no IPVS: the engine says so instead of failing on a socket detail."""
    with pytest.raises(table.IpvsError, match=r"IPVS is not reachable: .*no IPVS"):
        engine.IpvsEngine().read("10.0.100.1")

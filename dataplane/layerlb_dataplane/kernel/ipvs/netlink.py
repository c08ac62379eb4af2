"""IPVS through its generic netlink family, so that a sync of thousands of changes is a few system calls.

**Why not `ipvsadm`.** `ipvsadm -R` sends one netlink message per line and waits for its answer before
the next, and `ipvsadm -Ln` lists a table by one dump per virtual service and then prints text the engine
parses again. Both start a process. For 1,000 services x 10 real servers that is 11,000 round trips to
write and 1,001 dumps plus 11,000 lines of text to read, which alone overran the engine's budget for a
no-op re-sync. Here the engine packs up to `BATCH_BYTES` of requests into one `sendmsg` (the kernel runs
them in order inside that call), asks for an acknowledgement only of the last one (failures are
answered anyway, each naming its request by sequence number) and reads the services with one dump.
pyroute2 speaks this family too, but one request and answer at a time, decoding every attribute of
every message into Python objects (about 120 times slower for a sync's changes; see `engine`); the
messages layerlb needs are few and fixed, so they are packed with `struct`.

The socket is opened in the network namespace of the calling thread, like the `ip` and `nft` children
of the other engines. The message layouts are the kernel's UAPI (`linux/ip_vs.h`, `linux/netlink.h`,
`linux/genetlink.h`).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

# netlink / generic netlink
NETLINK_GENERIC: Final = 16
SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10  # socket option: failures do not echo the whole request back
SO_RCVBUFFORCE: Final = 33
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
GENL_ID_CTRL, CTRL_CMD_GETFAMILY = 0x10, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
NLA_F_NESTED: Final = 0x8000
HEADER: Final = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
GENL: Final = struct.Struct("=BBH")  # genlmsghdr: command, version, reserved
ATTR: Final = struct.Struct("=HH")  # nlattr: length, type
U16, U32, BE16 = struct.Struct("=H"), struct.Struct("=I"), struct.Struct("!H")
ERRNO: Final = struct.Struct("=i")  # nlmsgerr.error: 0 (acknowledged) or a negative errno
FRAMING: Final = HEADER.size + GENL.size

# IPVS
FAMILY_NAME: Final = "IPVS"
VERSION: Final = 1
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST = 5, 6, 7
CMD_ATTR_SERVICE, CMD_ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK = 1, 2, 3, 4, 5
SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK, SVC_PE_NAME = 6, 7, 8, 9, 11
DEST_ADDR, DEST_PORT, DEST_FWD_METHOD, DEST_WEIGHT, DEST_U_THRESH, DEST_L_THRESH = 1, 2, 3, 4, 5, 6
DEST_ADDR_FAMILY: Final = 11
PROTOCOLS: Final = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTOCOL_NAMES: Final = {number: name for name, number in PROTOCOLS.items()}

# service flags (IP_VS_SVC_F_*)
F_PERSISTENT, F_HASHED, F_ONEPACKET = 0x1, 0x2, 0x4
F_SCHED1, F_SCHED2, F_SCHED3 = 0x8, 0x10, 0x20
SCHEDULER_BITS: Final = (F_SCHED1, F_SCHED2, F_SCHED3)
ALL_FLAGS: Final = 0xFFFFFFFF
# The names ipvsadm's `-b` gives the scheduler flags, per scheduler (`flag-N` for the others).
SCHEDULER_FLAG_NAMES: Final = {
    "sh": ("sh-fallback", "sh-port", "flag-3"),
    "mh": ("mh-fallback", "mh-port", "flag-3"),
}
GENERIC_FLAG_NAMES: Final = ("flag-1", "flag-2", "flag-3")

# forwarding methods (IP_VS_CONN_F_*), by ipvsadm's option
FORWARDING: Final = {"-m": 0, "LOCAL": 1, "-i": 2, "-g": 3}

BATCH_BYTES: Final = 96 * 1024  # below the default socket send buffer (212,992 bytes, less overhead)
RECEIVE_BUFFER: Final = 4 * 1024 * 1024  # room for the failures of a whole batch
READ_SIZE: Final = 256 * 1024


class NetlinkError(OSError):
    """The kernel refused a netlink request that is not one of a batch's changes (family, dump)."""


@dataclass(frozen=True)
class ServiceEntry:
    """A virtual service as the kernel's service dump gives it (no real servers: /proc has those)."""

    protocol: str  # "TCP", "UDP", or the protocol number for others
    address: str  # canonical spelling; "" for a fwmark service
    port: int
    scheduler: str
    flags: int
    timeout: int
    netmask: bytes  # the raw attribute: a network-order mask (IPv4) or a prefix length (IPv6)
    pe: str | None
    fwmark: int


@dataclass(frozen=True)
class Failure:
    """A request of a batch the kernel refused: its index in the batch and the errno."""

    index: int
    errno: int

    @property
    def reason(self) -> str:
        return REASONS.get(self.errno) or os.strerror(self.errno)


# What IPVS means by the errors its commands return (ipvsadm words them the same way).
REASONS: Final = {
    errno.ESRCH: "no such service",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such destination, or scheduler/persistence engine not found",
    errno.EINVAL: "invalid argument",
    errno.EPERM: "operation not permitted (needs CAP_NET_ADMIN in this network namespace)",
    errno.ENOMEM: "out of memory",
    errno.EBUSY: "device or resource busy",
}


# --- attributes ------------------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = ATTR.size + len(payload)
    return ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def address_bytes(address: str) -> tuple[int, bytes]:
    """(family, the 16 bytes of `union nf_inet_addr`) for an address."""
    parsed = ipaddress.ip_address(address)
    if parsed.version == 4:
        return socket.AF_INET, parsed.packed + b"\0" * 12
    return socket.AF_INET6, parsed.packed


def service_identity(protocol: str, address: str, port: int) -> bytes:
    """The attributes that name a service (inside IPVS_CMD_ATTR_SERVICE)."""
    family, packed = address_bytes(address)
    return b"".join(
        (
            attr(SVC_AF, U16.pack(family)),
            attr(SVC_PROTOCOL, U16.pack(PROTOCOLS[protocol])),
            attr(SVC_ADDR, packed),
            attr(SVC_PORT, BE16.pack(port)),
        )
    )


def default_netmask(address: str) -> bytes:
    """The persistence granularity of one client address: 255.255.255.255, or /128 for IPv6."""
    return b"\xff\xff\xff\xff" if ipaddress.ip_address(address).version == 4 else U32.pack(128)


def service_settings(scheduler: str, flags: int, timeout: int, netmask: bytes) -> bytes:
    """What a full service entry (add, edit) needs besides its identity: the kernel refuses one without
    all four."""
    return b"".join(
        (
            attr(SVC_SCHED_NAME, scheduler.encode() + b"\0"),
            attr(SVC_FLAGS, U32.pack(flags) + U32.pack(ALL_FLAGS)),
            attr(SVC_TIMEOUT, U32.pack(timeout)),
            attr(SVC_NETMASK, netmask),
        )
    )


def dest_attrs(address: str, port: int, forward: str | None = None, weight: int | None = None) -> bytes:
    """A real server: identity only (delete), or a full entry (add, edit) with method and weight."""
    family, packed = address_bytes(address)
    parts = [
        attr(DEST_ADDR, packed),
        attr(DEST_PORT, BE16.pack(port)),
        attr(DEST_ADDR_FAMILY, U16.pack(family)),
    ]
    if forward is not None and weight is not None:
        parts += [
            attr(DEST_FWD_METHOD, U32.pack(FORWARDING[forward])),
            attr(DEST_WEIGHT, U32.pack(weight)),
            attr(DEST_U_THRESH, U32.pack(0)),
            attr(DEST_L_THRESH, U32.pack(0)),
        ]
    return b"".join(parts)


@dataclass(frozen=True)
class Request:
    """One IPVS command with its attributes, ready to be framed into a batch."""

    command: int
    body: bytes


def parse_attrs(data: bytes | memoryview, start: int, end: int) -> dict[int, memoryview]:
    """The attributes in data[start:end] by type (nested ones are parsed by the caller)."""
    view = memoryview(data)
    found: dict[int, memoryview] = {}
    while start + ATTR.size <= end:
        length, kind = ATTR.unpack_from(view, start)
        if length < ATTR.size:
            break
        found[kind & 0x3FFF] = view[start + ATTR.size : start + length]
        start += (length + 3) & ~3
    return found


def messages(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(type, sequence, offset of the payload, end) of each netlink message in one datagram."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, _flags, sequence, _port = HEADER.unpack_from(data, offset)
        if length < HEADER.size:
            return
        yield kind, sequence, offset + HEADER.size, offset + length
        offset += (length + 3) & ~3


def parse_service(payload: memoryview, address: bytes | None = None) -> ServiceEntry | None:
    """A service from the attributes of one dump message (after the generic netlink header); None when
    `address` (16 bytes, as `address_bytes` packs it) is given and the service is not on it."""
    top = parse_attrs(payload, 0, len(payload))
    raw = top.get(CMD_ATTR_SERVICE)
    if raw is None:
        return None
    found = parse_attrs(raw, 0, len(raw))
    fwmark = U32.unpack(found[SVC_FWMARK])[0] if SVC_FWMARK in found else 0
    packed = bytes(found[SVC_ADDR]) if SVC_ADDR in found and not fwmark else b""
    if address is not None and packed != address:
        return None
    family = U16.unpack(found[SVC_AF])[0] if SVC_AF in found else socket.AF_INET
    protocol_number = U16.unpack(found[SVC_PROTOCOL])[0] if SVC_PROTOCOL in found else 0
    text, port = "", 0
    if packed:
        text = _address_text(packed, family)
        port = BE16.unpack(found[SVC_PORT])[0] if SVC_PORT in found else 0
    flags_raw = found.get(SVC_FLAGS)
    return ServiceEntry(
        protocol=PROTOCOL_NAMES.get(protocol_number, str(protocol_number)),
        address=text,
        port=port,
        scheduler=_string(found.get(SVC_SCHED_NAME)),
        flags=U32.unpack_from(flags_raw, 0)[0] if flags_raw is not None else 0,
        timeout=U32.unpack(found[SVC_TIMEOUT])[0] if SVC_TIMEOUT in found else 0,
        netmask=bytes(found.get(SVC_NETMASK, b"")),
        pe=_string(found.get(SVC_PE_NAME)) or None,
        fwmark=fwmark,
    )


@functools.lru_cache(maxsize=4096)
def _address_text(packed: bytes, family: int) -> str:
    return str(ipaddress.ip_address(packed[:4] if family == socket.AF_INET else packed[:16]))


def _string(raw: memoryview | None) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace") if raw is not None else ""


def scheduler_flag_names(scheduler: str, flags: int) -> str | None:
    """The scheduler flags as ipvsadm's `-b` writes them (`sh-fallback,sh-port`), None when there are none."""
    names = SCHEDULER_FLAG_NAMES.get(scheduler, GENERIC_FLAG_NAMES)
    chosen = [name for bit, name in zip(SCHEDULER_BITS, names, strict=True) if flags & bit]
    return ",".join(chosen) or None


def scheduler_flag_bits(scheduler: str, names: str | None) -> int:
    """`sh-fallback,sh-port` (or `flag-1`) -> the flag bits; ValueError for a flag the scheduler lacks."""
    known = SCHEDULER_FLAG_NAMES.get(scheduler, GENERIC_FLAG_NAMES)
    bits = 0
    for name in filter(None, (names or "").split(",")):
        for index, bit in enumerate(SCHEDULER_BITS):
            if name in (known[index], GENERIC_FLAG_NAMES[index]):
                bits |= bit
                break
        else:
            raise ValueError(f"scheduler {scheduler} has no flag {name!r} (valid: {', '.join(known)})")
    return bits


# --- the socket ------------------------------------------------------------------------------------


class IpvsNetlink:
    """A generic netlink socket bound to the IPVS family, in the calling thread's network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except PermissionError:  # without CAP_NET_ADMIN the writes fail anyway; reads still work
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self._buffer = bytearray(READ_SIZE)
            self._sequence = 0
            self.family = self._family_id()
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> IpvsNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def services(self, address: str | None = None) -> list[ServiceEntry]:
        """The TCP and UDP services of this network namespace (on `address`, or all), by one dump;
        fwmark services and other protocols are not layerlb's kind and are left out."""
        wanted = address_bytes(address)[1] if address is not None else None
        found: list[ServiceEntry] = []
        for payload in self._dump(self.family, CMD_GET_SERVICE):
            entry = parse_service(payload[GENL.size :], wanted)
            if entry is not None and entry.address and entry.protocol in PROTOCOLS:
                found.append(entry)
        return found

    def apply(self, requests: Sequence[Request]) -> list[Failure]:
        """Sends `requests` in order, in batches of up to BATCH_BYTES, and returns the ones refused.

        A refused request does not stop the ones after it (the kernel runs each message of a batch),
        which is also how `ipvsadm -R` behaves; the caller decides what a failure means.
        """
        failures: list[Failure] = []
        start = 0
        while start < len(requests):
            end, size = start, 0
            while end < len(requests) and (
                end == start or size + FRAMING + len(requests[end].body) <= BATCH_BYTES
            ):
                size += FRAMING + len(requests[end].body)
                end += 1
            first = self._sequence + 1
            batch = b"".join(
                self._frame(
                    self.family, NLM_F_REQUEST | (NLM_F_ACK if index == end - 1 else 0), requests[index]
                )
                for index in range(start, end)
            )
            self._send(batch)
            last = self._sequence
            done = False
            while not done:
                for kind, sequence, payload, _end in messages(self._receive()):
                    if kind != NLMSG_ERROR or not first <= sequence <= last:
                        continue
                    code = -ERRNO.unpack_from(self._buffer, payload)[0]
                    if code:
                        failures.append(Failure(start + sequence - first, code))
                    done = done or sequence == last
            start = end
        return failures

    # --- internals ----------------------------------------------------------------------------------

    def _frame(self, family: int, flags: int, request: Request) -> bytes:
        self._sequence += 1
        length = HEADER.size + GENL.size + len(request.body)
        return (
            HEADER.pack(length, family, flags, self._sequence, 0)
            + GENL.pack(request.command, VERSION, 0)
            + request.body
        )

    def _send(self, data: bytes) -> None:
        sent = self._sock.send(data)
        if sent != len(data):
            raise NetlinkError(errno.EMSGSIZE, f"netlink sent {sent} of {len(data)} bytes")

    def _receive(self) -> memoryview:
        size = self._sock.recv_into(self._buffer)
        return memoryview(self._buffer)[:size]

    def _request(self, family: int, command: int, body: bytes, flags: int) -> Iterator[memoryview]:
        """Sends one request and yields the generic netlink payload of each answer until it is done."""
        frame = self._frame(family, NLM_F_REQUEST | flags, Request(command, body))
        sequence = self._sequence
        self._send(frame)
        while True:
            data = bytes(self._receive())  # the buffer is reused by the next read
            for kind, answer_to, payload, end in messages(data):
                if answer_to != sequence:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -ERRNO.unpack_from(data, payload)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                yield memoryview(data)[payload:end]
                if not flags & NLM_F_DUMP:
                    return  # a single answer

    def _dump(self, family: int, command: int) -> Iterator[memoryview]:
        return self._request(family, command, b"", NLM_F_DUMP)

    def _family_id(self) -> int:
        """The IPVS family's number; loads the ip_vs module once if the kernel does not know it yet."""
        for attempt in range(2):
            try:
                for payload in self._request(
                    GENL_ID_CTRL,
                    CTRL_CMD_GETFAMILY,
                    attr(CTRL_ATTR_FAMILY_NAME, FAMILY_NAME.encode() + b"\0"),
                    0,
                ):
                    found = parse_attrs(payload, GENL.size, len(payload))
                    if CTRL_ATTR_FAMILY_ID in found:
                        return int(U16.unpack(found[CTRL_ATTR_FAMILY_ID])[0])
            except NetlinkError as error:
                if error.errno != errno.ENOENT or attempt:
                    break
                if not _modprobe("ip_vs"):
                    break
        raise NetlinkError(
            errno.ENOENT, "this kernel has no IPVS (the ip_vs module is not loaded and could not be loaded)"
        )


def _modprobe(module: str) -> bool:
    """What ipvsadm does too when the family is missing: ask for the module once."""
    try:
        done = subprocess.run(["modprobe", module], capture_output=True, timeout=30, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0

"""PROXY protocol v1 (text) and v2 (binary): encode for backends, parse from trusted clients. Sans-IO.

The specification is HAProxy's `doc/proxy-protocol.txt`. Parsing is strict, because a PROXY header is
trusted to rewrite who the client is: anything not exactly a v1 line or a v2 block is refused, and the
caller closes the connection. Limits: a v1 line is at most 107 bytes including CRLF; a v2 header at most
`MAX_V2_HEADER` bytes (the format allows 16 + 65535; nothing legitimate comes close to 4 KiB).
TLVs of v2 are walked to check that their lengths exactly fill the header, and otherwise ignored.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from layerlb.api import ProxyProtocolVersion

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
MAX_V1_HEADER: Final = 107
MAX_V2_HEADER: Final = 4096

_V2_VERSION = 0x20
_V2_LOCAL, _V2_PROXY = 0x00, 0x01
# family/transport byte -> (address block length, transport); UNSPEC (0x00) carries no addresses
_V2_FAMILIES: Final[dict[int, tuple[int, Literal["TCP", "UDP"] | None]]] = {
    0x00: (0, None),
    0x11: (12, "TCP"),
    0x12: (12, "UDP"),
    0x21: (36, "TCP"),
    0x22: (36, "UDP"),
    0x31: (216, "TCP"),  # AF_UNIX stream: no IP endpoints to report, treated like LOCAL
    0x32: (216, "UDP"),
}
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyProtocolError(ValueError):
    """A malformed or unexpected PROXY header; the connection is closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """The original connection a PROXY header describes; `local` (v2 LOCAL / v1 UNKNOWN) carries none."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    transport: Literal["TCP", "UDP"] = "TCP"

    @property
    def local(self) -> bool:
        return self.source is None


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str, what: str) -> Address:
    """An IP address to encode; IPv4-mapped IPv6 (a dual-stack socket's view of IPv4) becomes IPv4."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError as error:
        raise ProxyProtocolError(f"{what} address {text!r} is not an IP address") from error
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise ProxyProtocolError(f"{what} address {text!r}: scoped addresses cannot be carried")
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def _port(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ProxyProtocolError(f"{what} port {value!r} is not in 0..65535")
    return value


def _as_ipv6(address: Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{address}")
    return address


def encode(
    version: ProxyProtocolVersion,
    source: tuple[str, int],
    destination: tuple[str, int],
    transport: Literal["TCP", "UDP"] = "TCP",
) -> bytes:
    """The header to send first on an upstream connection."""
    src, dst = _address(source[0], "source"), _address(destination[0], "destination")
    sport, dport = _port(source[1], "source"), _port(destination[1], "destination")
    if transport not in ("TCP", "UDP"):
        raise ProxyProtocolError(f"transport {transport!r} is neither TCP nor UDP")
    if src.version != dst.version:  # one side IPv6: carry both as IPv6, IPv4 mapped
        src, dst = _as_ipv6(src), _as_ipv6(dst)
    if version == ProxyProtocolVersion.v1:
        if transport != "TCP":
            raise ProxyProtocolError("PROXY protocol v1 carries TCP only")
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")
    if version == ProxyProtocolVersion.v2:
        family_byte = (0x10 if src.version == 4 else 0x20) | (0x1 if transport == "TCP" else 0x2)
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION | _V2_PROXY, family_byte, len(body)) + body
    raise ProxyProtocolError(f"unknown PROXY protocol version {version!r}")


def encode_local(version: ProxyProtocolVersion) -> bytes:
    """A header saying "no client behind this connection" (v1 UNKNOWN, v2 LOCAL), e.g. for health checks."""
    if version == ProxyProtocolVersion.v1:
        return b"PROXY UNKNOWN\r\n"
    if version == ProxyProtocolVersion.v2:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION | _V2_LOCAL, 0x00, 0)
    raise ProxyProtocolError(f"unknown PROXY protocol version {version!r}")


class HeaderParser:
    """Accumulates the first bytes of a client connection until a whole header (v1 or v2) is read."""

    def __init__(self, max_v2_header: int = MAX_V2_HEADER) -> None:
        self._buffer = bytearray()
        self._max_v2 = max_v2_header
        self._done = False

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """(header, bytes after it) once complete; None while more bytes are needed; raise on junk."""
        if self._done:
            raise ProxyProtocolError("the PROXY header was already read")
        self._buffer += data
        buffer = self._buffer
        if not buffer:
            return None
        if buffer[0] == V2_SIGNATURE[0]:
            result = self._v2(buffer)
        elif buffer[0] == V1_PREFIX[0]:
            result = self._v1(buffer)
        else:
            raise ProxyProtocolError("the connection does not start with a PROXY header")
        if result is None:
            return None
        header, length = result
        self._done = True
        rest = bytes(buffer[length:])
        self._buffer = bytearray()
        return header, rest

    def _v1(self, buffer: bytearray) -> tuple[ProxyHeader, int] | None:
        prefix = buffer[: len(V1_PREFIX)]
        if prefix != V1_PREFIX[: len(prefix)]:
            raise ProxyProtocolError("the connection does not start with a PROXY header")
        window = buffer[:MAX_V1_HEADER]
        end = window.find(b"\r\n")
        bad = window.find(b"\n")
        if bad != -1 and (end == -1 or bad < end + 1):
            raise ProxyProtocolError("PROXY v1 header: line feed without carriage return")
        carriage = window.find(b"\r")
        if carriage != -1 and carriage != end and carriage + 1 < len(window):
            raise ProxyProtocolError("PROXY v1 header: carriage return without line feed")
        if end == -1:
            if len(buffer) >= MAX_V1_HEADER:
                raise ProxyProtocolError(f"PROXY v1 header: no CRLF within {MAX_V1_HEADER} bytes")
            if not all(0x20 <= byte < 0x7F or byte == 0x0D for byte in window):
                raise ProxyProtocolError("PROXY v1 header: bytes that are not printable ASCII")
            return None
        return _parse_v1(bytes(buffer[:end])), end + 2

    def _v2(self, buffer: bytearray) -> tuple[ProxyHeader, int] | None:
        prefix = buffer[: len(V2_SIGNATURE)]
        if prefix != V2_SIGNATURE[: len(prefix)]:
            raise ProxyProtocolError("PROXY v2 header: bad signature")
        if len(buffer) < 13:
            return None
        version_command = buffer[12]
        if version_command & 0xF0 != _V2_VERSION:
            raise ProxyProtocolError(f"PROXY v2 header: version {version_command >> 4} is not 2")
        command = version_command & 0x0F
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyProtocolError(f"PROXY v2 header: unknown command {command}")
        if len(buffer) < 14:
            return None
        family = buffer[13]
        if family not in _V2_FAMILIES:
            raise ProxyProtocolError(f"PROXY v2 header: unknown family/transport 0x{family:02x}")
        if len(buffer) < 16:
            return None
        (length,) = struct.unpack_from("!H", buffer, 14)
        total = 16 + length
        if total > self._max_v2:
            raise ProxyProtocolError(f"PROXY v2 header: {total} bytes is over the limit of {self._max_v2}")
        address_length, transport = _V2_FAMILIES[family]
        if length < address_length:
            raise ProxyProtocolError(
                f"PROXY v2 header: length {length} is too short for family 0x{family:02x}"
            )
        if len(buffer) < total:
            return None
        _check_tlvs(bytes(buffer[16 + address_length : total]))
        if command == _V2_LOCAL or transport is None or family >> 4 == 3:
            return ProxyHeader(None, None, transport or "TCP"), total
        block = bytes(buffer[16 : 16 + address_length])
        if family >> 4 == 1:
            src: Address = ipaddress.IPv4Address(block[0:4])
            dst: Address = ipaddress.IPv4Address(block[4:8])
        else:
            src, dst = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        sport, dport = struct.unpack_from("!HH", block, address_length - 4)
        return ProxyHeader((str(src), sport), (str(dst), dport), transport), total


def _check_tlvs(data: bytes) -> None:
    """TLVs must tile the rest of the header exactly: a truncated one means a broken or forged header."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyProtocolError("PROXY v2 header: truncated TLV")
        (length,) = struct.unpack_from("!H", data, offset + 1)
        offset += 3 + length
        if offset > len(data):
            raise ProxyProtocolError("PROXY v2 header: a TLV runs past the end of the header")


def _parse_v1(line: bytes) -> ProxyHeader:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as error:
        raise ProxyProtocolError("PROXY v1 header: bytes that are not ASCII") from error
    if not text.isprintable():
        raise ProxyProtocolError("PROXY v1 header: control characters")
    parts = text.split(" ")
    if len(parts) < 2 or parts[0] != "PROXY":
        raise ProxyProtocolError("PROXY v1 header: malformed")
    family = parts[1]
    if family == "UNKNOWN":  # the rest of the line, if any, is to be ignored
        return ProxyHeader(None, None)
    if family not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1 header: unknown protocol {family[:8]!r}")
    if len(parts) != 6:
        raise ProxyProtocolError("PROXY v1 header: expected source, destination and two ports")
    src = _v1_address(parts[2], family)
    dst = _v1_address(parts[3], family)
    return ProxyHeader((src, _v1_port(parts[4])), (dst, _v1_port(parts[5])), "TCP")


def _v1_address(text: str, family: str) -> str:
    try:
        if family == "TCP4":
            return str(ipaddress.IPv4Address(text))
        if "%" in text:  # a scope means nothing to the receiver
            raise ValueError(text)
        return str(ipaddress.IPv6Address(text))
    except ValueError as error:
        raise ProxyProtocolError(f"PROXY v1 header: {text[:46]!r} is not an {family} address") from error


def _v1_port(text: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1 header: {text[:8]!r} is not a port")
    return int(text)


@functools.lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def trusted(peer_ip: str, cidrs: Sequence[str]) -> bool:
    """Whether a peer may (and so must) send a PROXY header."""
    try:
        peer = ipaddress.ip_address(peer_ip.partition("%")[0])
    except ValueError:
        return False
    candidates: list[Address] = [peer]
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        candidates.append(peer.ipv4_mapped)  # a dual-stack listener sees IPv4 clients this way
    return any(
        address.version == network.version and address in network
        for network in _networks(tuple(cidrs))
        for address in candidates
    )

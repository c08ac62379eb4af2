"""PROXY protocol: a table of good and bad headers, round trips, random garbage, and HAProxy as the reference.

HAProxy is run for real in both directions: its `send-proxy` / `send-proxy-v2` headers (and the LOCAL
headers of its health checks) must parse, and headers `encode` writes must be accepted by its
`accept-proxy`, which reports the client address it understood.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from layerlb_dataplane.net.proxy_protocol import (
    MAX_V1_HEADER,
    V2_SIGNATURE,
    HeaderParser,
    ProxyHeader,
    ProxyProtocolError,
    encode,
    encode_local,
    trusted,
)

from layerlb.api import ProxyProtocolVersion
from tests.dataplane.conftest import ServerThread
from tests.dataplane.helpers_runtime import free_port, wait_until

V1, V2 = ProxyProtocolVersion.v1, ProxyProtocolVersion.v2


def v2(command: int, family: int, body: bytes, length: int | None = None, version: int = 2) -> bytes:
    """A hand-made v2 header, so tests can state each field, including wrong ones."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", version << 4 | command, family, size) + body


IPV4_BODY = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 56324, 443)
IPV6_BODY = (
    bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + struct.pack("!HH", 1, 65535)
)
TLVS = bytes([0x04]) + struct.pack("!H", 0) + bytes([0x05]) + struct.pack("!H", 3) + b"abc"
SRC4, DST4 = ("192.0.2.1", 56324), ("198.51.100.2", 443)
SRC6, DST6 = ("2001:db8::1", 1), ("2001:db8::2", 65535)
LOCAL = ProxyHeader(None, None)
WORST_V1 = (
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"65535 65535\r\n"
)

GOOD: list[tuple[str, bytes, ProxyHeader]] = [
    ("v1 tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", ProxyHeader(SRC4, DST4)),
    ("v1 tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", ProxyHeader(SRC6, DST6)),
    (
        "v1 tcp6 mapped",
        b"PROXY TCP6 ::ffff:10.0.0.1 ::1 0 80\r\n",
        ProxyHeader(("::ffff:a00:1", 0), ("::1", 80)),
    ),
    ("v1 unknown", b"PROXY UNKNOWN\r\n", LOCAL),
    ("v1 unknown with addresses", WORST_V1, LOCAL),
    ("v2 tcp4", v2(1, 0x11, IPV4_BODY), ProxyHeader(SRC4, DST4)),
    ("v2 udp4", v2(1, 0x12, IPV4_BODY), ProxyHeader(SRC4, DST4, "UDP")),
    ("v2 tcp6", v2(1, 0x21, IPV6_BODY), ProxyHeader(SRC6, DST6)),
    ("v2 udp6", v2(1, 0x22, IPV6_BODY), ProxyHeader(SRC6, DST6, "UDP")),
    ("v2 tcp4 with TLVs", v2(1, 0x11, IPV4_BODY + TLVS), ProxyHeader(SRC4, DST4)),
    ("v2 local", v2(0, 0x00, b""), LOCAL),
    ("v2 local with addresses", v2(0, 0x11, IPV4_BODY + TLVS), LOCAL),
    ("v2 proxy unspec", v2(1, 0x00, TLVS), LOCAL),
    ("v2 unix", v2(1, 0x31, bytes(216)), LOCAL),
]

BAD: list[tuple[str, bytes]] = [
    ("http request", b"GET / HTTP/1.1\r\n\r\n"),
    ("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    ("lower case", b"proxy TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"),
    ("bare LF", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n"),
    ("CR CR LF", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\r\n"),
    ("bare CR inside", b"PROXY TCP4 192.0.2.1\r198.51.100.2 56324 443\r\n"),
    ("double space", b"PROXY  TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"),
    ("trailing space", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 \r\n"),
    ("tab", b"PROXY TCP4 192.0.2.1\t198.51.100.2 56324 443\r\n"),
    ("no fields", b"PROXY\r\n"),
    ("unknown protocol", b"PROXY TCP5 192.0.2.1 198.51.100.2 56324 443\r\n"),
    ("udp in v1", b"PROXY UDP4 192.0.2.1 198.51.100.2 56324 443\r\n"),
    ("missing port", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n"),
    ("extra field", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443 1\r\n"),
    ("octet over 255", b"PROXY TCP4 256.0.2.1 198.51.100.2 56324 443\r\n"),
    ("leading zero octet", b"PROXY TCP4 192.0.2.01 198.51.100.2 56324 443\r\n"),
    ("v6 in TCP4", b"PROXY TCP4 2001:db8::1 198.51.100.2 56324 443\r\n"),
    ("v4 in TCP6", b"PROXY TCP6 192.0.2.1 2001:db8::2 56324 443\r\n"),
    ("scoped v6", b"PROXY TCP6 fe80::1%eth0 2001:db8::2 56324 443\r\n"),
    ("hostname", b"PROXY TCP4 example.com 198.51.100.2 56324 443\r\n"),
    ("port over 65535", b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n"),
    ("port leading zero", b"PROXY TCP4 192.0.2.1 198.51.100.2 0443 443\r\n"),
    ("port sign", b"PROXY TCP4 192.0.2.1 198.51.100.2 +443 443\r\n"),
    ("port negative", b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 443\r\n"),
    ("port unicode digit", "PROXY TCP4 192.0.2.1 198.51.100.2 ٣ 443\r\n".encode()),
    ("non-ascii", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 44\xff\r\n"),
    ("NUL", b"PROXY TCP4 192.0.2.1 198.51.100.2 5632\x00 443\r\n"),
    ("no CRLF in 107 bytes", b"PROXY UNKNOWN " + b"a" * 120),
    ("CRLF at byte 108", WORST_V1[:-2] + b"5\r\n"),
    ("v2 bad signature", V2_SIGNATURE[:-1] + b"X" + v2(1, 0x11, IPV4_BODY)[12:]),
    ("v2 version 1", v2(1, 0x11, IPV4_BODY, version=1)),
    ("v2 version 3", v2(1, 0x11, IPV4_BODY, version=3)),
    ("v2 command 2", v2(2, 0x11, IPV4_BODY)),
    ("v2 family 0x13", v2(1, 0x13, IPV4_BODY)),
    ("v2 family 0x41", v2(1, 0x41, IPV4_BODY)),
    ("v2 family 0x01", v2(1, 0x01, IPV4_BODY)),
    ("v2 short for ipv4", v2(1, 0x11, IPV4_BODY[:11])),
    ("v2 short for ipv6", v2(1, 0x21, IPV4_BODY)),
    ("v2 truncated TLV", v2(1, 0x11, IPV4_BODY + b"\x04\x00")),
    ("v2 TLV overruns", v2(1, 0x11, IPV4_BODY + b"\x04\x00\x05abc")),
    ("v2 over the size cap", v2(1, 0x11, b"", length=5000)),
]


def parse(data: bytes, byte_by_byte: bool = False) -> tuple[ProxyHeader, bytes] | None:
    """Feeds `data` in one piece or byte by byte; the rest includes whatever followed the header."""
    parser = HeaderParser()
    if not byte_by_byte:
        return parser.feed(data)
    for index in range(len(data)):
        result = parser.feed(data[index : index + 1])
        if result is not None:
            header, rest = result
            return header, rest + data[index + 1 :]
    return None


@pytest.mark.parametrize(("data", "expected"), [(d, e) for _, d, e in GOOD], ids=[n for n, _, _ in GOOD])
@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "bytewise"])
def test_good_headers(data: bytes, expected: ProxyHeader, byte_by_byte: bool) -> None:
    assert parse(data + b"GET / HTTP/1.1\r\n", byte_by_byte) == (expected, b"GET / HTTP/1.1\r\n")
    assert parse(data[:-1], byte_by_byte) is None  # one byte short: wait for more


def test_worst_case_v1_is_exactly_the_limit() -> None:
    assert len(WORST_V1) == MAX_V1_HEADER


@pytest.mark.parametrize("data", [d for _, d in BAD], ids=[n for n, _ in BAD])
@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "bytewise"])
def test_bad_headers(data: bytes, byte_by_byte: bool) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data + b"\r\n\r\n" + bytes(200), byte_by_byte)


@pytest.mark.parametrize(
    ("prefix", "needed"),
    [
        (b"GET", 1),  # junk is refused at the first byte that cannot start a header
        (b"PRX", 3),
        (V2_SIGNATURE[:5] + b"X", 6),
        (v2(1, 0x11, b"", length=5000)[:16], 16),  # oversize: refused before its body arrives
    ],
)
def test_refused_as_early_as_possible(prefix: bytes, needed: int) -> None:
    parser = HeaderParser()
    for index in range(needed - 1):
        assert parser.feed(prefix[index : index + 1]) is None
    with pytest.raises(ProxyProtocolError):
        parser.feed(prefix[needed - 1 : needed])


def test_parser_is_single_use_and_waits_on_empty_input() -> None:
    parser = HeaderParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY UNKNOWN\r\n") == (LOCAL, b"")
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"more")


@pytest.mark.parametrize("version", [V1, V2])
@pytest.mark.parametrize(
    ("source", "destination", "expected_source", "expected_destination"),
    [
        (SRC4, DST4, SRC4, DST4),
        (SRC6, DST6, SRC6, DST6),
        (("::ffff:10.0.0.1", 1234), ("::ffff:10.0.0.2", 80), ("10.0.0.1", 1234), ("10.0.0.2", 80)),
        (("10.0.0.1", 0), ("2001:db8::2", 80), ("::ffff:a00:1", 0), ("2001:db8::2", 80)),
        (("2001:0db8:0:0::1", 65535), ("::1", 1), ("2001:db8::1", 65535), ("::1", 1)),
    ],
)
def test_round_trip(
    version: ProxyProtocolVersion,
    source: tuple[str, int],
    destination: tuple[str, int],
    expected_source: tuple[str, int],
    expected_destination: tuple[str, int],
) -> None:
    data = encode(version, source, destination)
    assert len(data) <= MAX_V1_HEADER or version == V2
    assert parse(data + b"x") == (ProxyHeader(expected_source, expected_destination), b"x")
    assert parse(data + b"x", byte_by_byte=True) == (ProxyHeader(expected_source, expected_destination), b"x")


def test_encoding_matches_the_specification() -> None:
    assert encode(V1, ("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert encode(V2, SRC4, DST4) == v2(1, 0x11, IPV4_BODY)
    assert encode(V2, SRC6, DST6, "UDP") == v2(1, 0x22, IPV6_BODY)
    assert encode("v1", SRC4, DST4) == encode(V1, SRC4, DST4)  # type: ignore[arg-type]
    assert encode_local(V1) == b"PROXY UNKNOWN\r\n"
    assert encode_local(V2) == v2(0, 0x00, b"")
    assert parse(encode_local(V2)) == (LOCAL, b"")
    assert parse(encode(V2, SRC4, DST4, "UDP")) == (ProxyHeader(SRC4, DST4, "UDP"), b"")


@pytest.mark.parametrize(
    ("version", "source", "destination", "transport"),
    [
        (V1, SRC4, DST4, "UDP"),  # v1 has no UDP
        (V2, ("example.com", 1), DST4, "TCP"),
        (V2, SRC4, ("198.51.100.2", 65536), "TCP"),
        (V2, SRC4, ("198.51.100.2", -1), "TCP"),
        (V1, ("fe80::1%eth0", 1), DST6, "TCP"),
        (V2, SRC4, DST4, "SCTP"),
    ],
)
def test_encode_refuses_what_cannot_be_carried(
    version: ProxyProtocolVersion, source: tuple[str, int], destination: tuple[str, int], transport: str
) -> None:
    with pytest.raises(ProxyProtocolError):
        encode(version, source, destination, transport)  # type: ignore[arg-type]


def test_random_garbage_raises_only_proxy_protocol_errors() -> None:
    rng = random.Random(20261128)
    seeds = [d for _, d, _ in GOOD] + [d for _, d in BAD]
    outcomes = {"parsed": 0, "refused": 0, "waiting": 0}
    for _ in range(20000):
        kind = rng.random()
        if kind < 0.3:
            data = rng.randbytes(rng.randint(0, 300))
        else:  # mutate a real header: flip, cut, insert or duplicate bytes
            mutated = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                position = rng.randint(0, len(mutated))
                operation = rng.random()
                if operation < 0.4 and position < len(mutated):
                    mutated[position] = rng.randrange(256)
                elif operation < 0.6:
                    del mutated[position:]
                elif operation < 0.8:
                    mutated[position:position] = rng.randbytes(rng.randint(1, 8))
                else:
                    mutated[position:position] = mutated[:position]
            data = bytes(mutated)
        parser = HeaderParser()
        try:
            result = None
            position = 0
            while position < len(data) and result is None:
                step = rng.randint(1, 40)
                result = parser.feed(data[position : position + step])
                position += step
        except ProxyProtocolError:
            outcomes["refused"] += 1
            continue
        outcomes["parsed" if result else "waiting"] += 1
    assert all(count > 100 for count in outcomes.values()), outcomes


@pytest.mark.parametrize(
    ("peer", "cidrs", "expected"),
    [
        ("10.0.0.1", ["10.0.0.0/8"], True),
        ("11.0.0.1", ["10.0.0.0/8"], False),
        ("::ffff:10.0.0.1", ["10.0.0.0/8"], True),  # a dual-stack listener's view of an IPv4 client
        ("::ffff:10.0.0.1", ["::ffff:0:0/96"], True),
        ("::ffff:11.0.0.1", ["10.0.0.0/8", "192.0.2.0/24"], False),
        ("2001:db8::5", ["10.0.0.0/8", "2001:db8::/32"], True),
        ("2001:db9::5", ["2001:db8::/32"], False),
        ("fe80::1%eth0", ["fe80::/10"], True),
        ("10.0.0.1", ["10.0.0.1/32"], True),
        ("10.0.0.1", ["10.0.0.1"], True),
        ("10.0.0.1", ["::/0"], False),  # IPv4 peers need IPv4 ranges
        ("10.0.0.1", [], False),
        ("not-an-ip", ["0.0.0.0/0"], False),
    ],
)
def test_trusted(peer: str, cidrs: list[str], expected: bool) -> None:
    assert trusted(peer, cidrs) is expected


# ---- HAProxy as the reference -------------------------------------------------------------------------


class Sink(ServerThread):
    """A backend that reads a PROXY header with HeaderParser and answers with what it parsed (JSON)."""

    def __init__(self) -> None:
        self.locals: list[ProxyHeader] = []
        self.errors: list[str] = []
        super().__init__(self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = HeaderParser()
        try:
            result = None
            size = 0
            while result is None:
                data = await reader.read(1)  # byte by byte, as slow clients would deliver it
                if not data:
                    return
                size += 1
                result = parser.feed(data)
            header, rest = result
            if header.local:  # HAProxy's health checks
                self.locals.append(header)
                return
            rest += await reader.readuntil(b"\n")
            answer = {
                "source": header.source,
                "destination": header.destination,
                "rest": rest.decode(),
                "size": size,
            }
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except ProxyProtocolError as error:
            self.errors.append(str(error))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def start_haproxy(config: str, directory: Path, ports: list[tuple[str, int]]) -> subprocess.Popen[bytes]:
    path = directory / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )

    def listening() -> bool:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else "haproxy exited"
        for host, port in ports:
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                return False
        return True

    try:
        wait_until(listening, 10, "haproxy to listen")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


DEFAULTS = """
global
    maxconn 100
defaults
    timeout connect 5s
    timeout client 10s
    timeout server 10s
"""


def exchange(
    family: socket.AddressFamily, host: str, port: int, payload: bytes
) -> tuple[bytes, tuple[str, int]]:
    """Sends `payload` from a fresh socket and reads until the server closes; returns (reply, our address)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((host, port))
        local = sock.getsockname()
        sock.sendall(payload)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply, (local[0], local[1])


@pytest.fixture(scope="module")
def haproxy_sender(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sink, int, int]]:
    """HAProxy in TCP mode relaying to the Sink with send-proxy (v1) and send-proxy-v2 with TLVs."""
    sink = Sink()
    p1, p2 = free_port("127.0.0.1"), free_port("127.0.0.1")
    config = (
        DEFAULTS
        + f"""
frontend v1_in
    mode tcp
    bind 127.0.0.1:{p1}
    bind [::1]:{p1}
    default_backend v1_out
backend v1_out
    mode tcp
    server sink 127.0.0.1:{sink.port} send-proxy check inter 100ms
frontend v2_in
    mode tcp
    bind 127.0.0.1:{p2}
    bind [::1]:{p2}
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
    default_backend v2_out
backend v2_out
    mode tcp
    server sink 127.0.0.1:{sink.port} send-proxy-v2 proxy-v2-options crc32c,unique-id check inter 100ms
"""
    )
    process = start_haproxy(
        config, tmp_path_factory.mktemp("haproxy-send"), [("127.0.0.1", p1), ("127.0.0.1", p2)]
    )
    try:
        yield sink, p1, p2
    finally:
        stop(process)
        sink.close()


@pytest.mark.parametrize("which", ["v1", "v2"])
@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_parser_reads_haproxy_headers(
    haproxy_sender: tuple[Sink, int, int], which: str, family: socket.AddressFamily, host: str
) -> None:
    sink, p1, p2 = haproxy_sender
    port = p1 if which == "v1" else p2
    reply, local = exchange(family, host, port, b"hello\n")
    assert reply, sink.errors
    answer = json.loads(reply)
    size = answer.pop("size")
    assert answer == {"source": [host, local[1]], "destination": [host, port], "rest": "hello\n"}
    if which == "v1":
        assert size == len(f"PROXY TCP{family_digit(family)} {host} {host} {local[1]} {port}\r\n")
    else:  # signature and fixed part, addresses, then HAProxy's TLVs (crc32c, unique-id) that were skipped
        assert size > 16 + (12 if family == socket.AF_INET else 36) + 7
    assert not sink.errors


def family_digit(family: socket.AddressFamily) -> str:
    return "4" if family == socket.AF_INET else "6"


def test_parser_reads_haproxy_health_check_headers(haproxy_sender: tuple[Sink, int, int]) -> None:
    sink, _, _ = haproxy_sender
    wait_until(lambda: len(sink.locals) >= 4, 10, "HAProxy's health checks (LOCAL / UNKNOWN headers)")
    assert not sink.errors


@pytest.fixture(scope="module")
def haproxy_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """HAProxy with `accept-proxy`, answering with the client address it took from the header."""
    port = free_port("127.0.0.1")
    config = (
        DEFAULTS
        + f"""
frontend accept
    mode http
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port] %[dst] %[dst_port]"
"""
    )
    process = start_haproxy(config, tmp_path_factory.mktemp("haproxy-accept"), [("127.0.0.1", port)])
    try:
        yield port
    finally:
        stop(process)


REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("version", [V1, V2])
@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        (("203.0.113.7", 4242), ("198.51.100.1", 80), "203.0.113.7 4242 198.51.100.1 80"),
        (("2001:db8::7", 65535), ("2001:db8::1", 443), "2001:db8::7 65535 2001:db8::1 443"),
        (("::ffff:203.0.113.9", 1), ("::ffff:198.51.100.1", 8080), "203.0.113.9 1 198.51.100.1 8080"),
    ],
)
def test_haproxy_accepts_encoded_headers(
    haproxy_receiver: int,
    version: ProxyProtocolVersion,
    source: tuple[str, int],
    destination: tuple[str, int],
    expected: str,
) -> None:
    reply, _ = exchange(
        socket.AF_INET, "127.0.0.1", haproxy_receiver, encode(version, source, destination) + REQUEST
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert reply.split(b"\r\n\r\n", 1)[1].decode() == expected


@pytest.mark.parametrize("version", [V1, V2])
def test_haproxy_accepts_local_headers(haproxy_receiver: int, version: ProxyProtocolVersion) -> None:
    reply, local = exchange(socket.AF_INET, "127.0.0.1", haproxy_receiver, encode_local(version) + REQUEST)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert reply.split(b"\r\n\r\n", 1)[1].decode() == f"127.0.0.1 {local[1]} 127.0.0.1 {haproxy_receiver}"

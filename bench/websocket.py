"""A minimal WebSocket echo server and client (RFC 6455, stdlib only), so the reload scenario can hold
long-lived upgraded connections through a proxy and notice the moment one of them is dropped.

Only what the scenario needs: the Upgrade handshake, single-frame text messages (masked from the client,
as the RFC requires), ping/pong and close. The server runs as its own process:
`python -m bench.websocket HOST PORT` prints `ready` once it listens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
import sys
import time
from dataclasses import dataclass, field

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B18"
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


def accept_key(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def encode_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final frame; clients must mask, servers must not."""
    length = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one frame: (opcode, unmasked payload)."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    key = await reader.readexactly(4) if second & 0x80 else b""
    payload = await reader.readexactly(length)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


# --- the echo server ---------------------------------------------------------------------------------


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get(b"sec-websocket-key")
        if key is None or b"websocket" not in headers.get(b"upgrade", b"").lower():
            body = b"websocket echo\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            return
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
        )
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == CLOSE:
                writer.write(encode_frame(CLOSE, payload[:2], mask=False))
                await writer.drain()
                return
            writer.write(encode_frame(PONG if opcode == PING else opcode, payload, mask=False))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        return
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    """Echo every WebSocket message back until killed; print `ready` once listening."""
    server = await asyncio.start_server(_serve_connection, host, port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# --- the client --------------------------------------------------------------------------------------


@dataclass
class LongLived:
    """One long-lived WebSocket connection through the subject and what happened to it."""

    number: int
    echoed: int = 0
    dropped: str | None = None  # why and when it was lost; None while it lives
    opened: bool = False
    latencies: list[float] = field(default_factory=list)


async def open_connection(
    host: str, port: int, path: str, timeout: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and complete the Upgrade handshake; raise ConnectionError unless the answer is 101."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET %s HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), key)
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    if not head.startswith(b"HTTP/1.1 101") or accept_key(key) not in head:
        writer.close()
        status = head.split(b"\r\n", 1)[0]
        raise ConnectionError(f"no WebSocket upgrade: {status!r}")
    return reader, writer


async def hold(
    state: LongLived,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stop: asyncio.Event,
    interval: float = 0.5,
    timeout: float = 5.0,
) -> None:
    """Send a message every `interval` and wait for its echo until `stop`; record the first failure."""
    started = time.monotonic()
    try:
        while not stop.is_set():
            message = f"{state.number}:{state.echoed}".encode()
            sent = time.monotonic()
            writer.write(encode_frame(TEXT, message, mask=True))
            await writer.drain()
            opcode, payload = await asyncio.wait_for(read_frame(reader), timeout)
            if opcode != TEXT or payload != message:
                raise ConnectionError(f"wrong echo {opcode}:{payload[:40]!r}")
            state.echoed += 1
            state.latencies.append(time.monotonic() - sent)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        writer.write(encode_frame(CLOSE, struct.pack("!H", 1000), mask=True))
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ConnectionError) as error:
        kind = type(error).__name__
        state.dropped = f"after {time.monotonic() - started:.1f} s: {kind} {error}".strip()
    finally:
        writer.close()


def main(argv: list[str]) -> int:
    """`python -m bench.websocket HOST PORT`: run the echo server."""
    host, port = argv[0], int(argv[1])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

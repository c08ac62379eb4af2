"""The abuse tests' peers, each its own process so that neither shares a CPU schedule or a GIL with the
abuse: a backend and the legitimate client whose latency is measured.

`python -m tests.chaos.abuse_peers backend PORT` serves HTTP/1.1 on 127.0.0.1:PORT: `/big` answers
`BIG_BYTES` (written with flow control, so a client that never reads stalls it), `/upload` reads the whole
request body and answers its length, anything else answers `ok`. It prints `ready` once listening.

`python -m tests.chaos.abuse_peers probe HOST PORT SOURCE SECONDS INTERVAL` is the legitimate client: a GET
on a new connection (from SOURCE, so a per-client cap on the abusers' address is not its own) every
INTERVAL seconds for SECONDS, each timed from connect to the response's end; it prints one JSON line
`{"latencies": [...], "failures": N, "errors": [...]}` (a failure: no 200 within `PROBE_TIMEOUT`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

BIG_BYTES = 256 << 20
CHUNK = 1 << 16
PROBE_TIMEOUT = 10.0


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, _, rest = head.partition(b"\r\n")
            path = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
            length = 0
            for header in rest.split(b"\r\n"):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            received = 0
            while received < length:
                data = await reader.read(min(CHUNK * 16, length - received))
                if not data:
                    return
                received += len(data)
            if path == b"/big":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_BYTES)
                block = b"x" * CHUNK
                for _ in range(BIG_BYTES // CHUNK):
                    writer.write(block)
                    await writer.drain()
                continue
            body = b"%d\n" % received if path == b"/upload" else b"ok\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def _backend(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096, limit=1 << 20)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def _get(host: str, port: int, source: str) -> float:
    """One GET on a new connection from `source`: its seconds, or raise when it is not a 200."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT, source_address=(source, 0)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise OSError(f"answer {data[:40]!r}")
    return time.monotonic() - started


def probe(host: str, port: int, source: str, seconds: float, interval: float) -> dict[str, object]:
    """GETs at a steady pace for `seconds`: their latencies and failures."""
    latencies: list[float] = []
    errors: list[str] = []
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < end:
        try:
            latencies.append(_get(host, port, source))
        except OSError as error:
            errors.append(str(error))
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            next_at = time.monotonic()  # late (a slow answer): no burst to catch up
    return {"latencies": latencies, "failures": len(errors), "errors": errors[:5]}


def main(argv: list[str]) -> int:
    if argv[:1] == ["backend"]:
        asyncio.run(_backend(int(argv[1])))
        return 0
    if argv[:1] == ["probe"]:
        host, port, source, seconds, interval = argv[1:6]
        print(json.dumps(probe(host, int(port), source, float(seconds), float(interval))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

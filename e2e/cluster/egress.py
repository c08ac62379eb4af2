"""The API server's way into the nodes' network: an HTTP CONNECT proxy on a unix socket.

The API server runs on the host's loopback; kubelets listen inside the nodes' network namespaces. For
`kubectl logs/exec/port-forward` (and webhooks, Service proxying) the API server dials through its
egress selector (`EgressSelectorConfiguration`, selection `cluster`, HTTPConnect over a unix socket):
this process, started inside the nodes' network namespace, accepts those CONNECTs on the socket (a file,
so it crosses network namespaces) and opens the TCP connection from inside.

    nsenter --net=/run/netns/NET python e2e/cluster/egress.py /path/egress.sock
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

MAX_HEAD = 8192


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy `reader` to `writer` until EOF, then half-close `writer` (the other direction may go on)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        writer.close()
        return
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(request_line) != 3 or request_line[0] != "CONNECT":
        writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        writer.close()
        return
    host, _, port = request_line[1].rpartition(":")
    try:
        upstream_reader, upstream_writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout=10
        )
    except (OSError, ValueError, TimeoutError) as error:
        writer.write(f"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nX-Error: {error}\r\n\r\n".encode())
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
    for w in (writer, upstream_writer):
        w.close()


async def main(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(_serve, path=path, limit=MAX_HEAD)
    os.chmod(path, 0o600)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

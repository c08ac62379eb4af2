"""A TCP relay from a socket in the lab's router namespace to the API server on the host's loopback.

Plays the `kubernetes` Service's ClusterIP (kube-proxy's job): pods dial 10.0.0.1:443, a SAN of the API
server's certificate, so TLS verification with the ServiceAccount's `ca.crt` passes unchanged. The
listening socket is opened inside the router's namespace; the relay's own connections to the API server
are opened from the root namespace, where this process lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

from e2e.runner.network import in_namespace


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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


class Relay:
    """Listens on `listen` (host, port) in network namespace `namespace`; forwards to `target`."""

    def __init__(self, namespace: str, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target

        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(listen)
            sock.listen(128)
            sock.setblocking(False)
            return sock

        self.socket = in_namespace(namespace, bind)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="api-relay", daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
            pending = asyncio.all_tasks(self.loop)
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._connection, sock=self.socket)
        self.ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.server.serve_forever()

    async def _connection(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            client.close()
            return
        try:
            await asyncio.gather(_pipe(client_reader, upstream), _pipe(upstream_reader, client))
        finally:
            for writer in (client, upstream):
                writer.close()

    def close(self) -> None:
        """Stops listening (open connections are dropped with the loop)."""

        def stop() -> None:
            self.server.close()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(stop)
            self.thread.join(10)
        self.socket.close()

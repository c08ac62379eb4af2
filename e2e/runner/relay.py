"""A TCP relay from a socket in the lab's router namespace to the API server on the host's loopback.

Plays the `kubernetes` Service's ClusterIP (kube-proxy's job): pods dial 10.0.0.1:443, a SAN of the API
server's certificate, so TLS verification with the ServiceAccount's `ca.crt` passes unchanged. The
listening socket is opened inside the router's namespace; the relay's own connections to the API server
are opened from the root namespace, where this process lives.
"""

from __future__ import annotations

import asyncio
import socket
import threading

from e2e.cluster.egress import pipe
from e2e.runner.network import in_namespace


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
        self.stopping = asyncio.Event()  # set (on the loop) by `close`
        self.connections: set[asyncio.Task[None]] = set()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="api-relay", daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
            # Handlers of connections accepted while `_serve` was ending: they see `stopping` and return.
            pending = asyncio.all_tasks(self.loop)
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        """Serves until `close`, then ends every open connection and waits for their handlers."""
        self.server = await asyncio.start_server(self._connection, sock=self.socket)
        self.ready.set()
        await self.stopping.wait()
        self.server.close()
        for task in self.connections:
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        await self.server.wait_closed()

    async def _connection(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        writers = [client]
        try:
            if self.stopping.is_set():
                return
            try:
                upstream_reader, upstream = await asyncio.open_connection(*self.target)
            except OSError:
                return
            writers.append(upstream)
            await asyncio.gather(pipe(client_reader, upstream), pipe(upstream_reader, client))
        except asyncio.CancelledError:
            # `_serve` cancels open connections when the relay closes: that is how they end, not an error
            # (Python 3.11's asyncio.streams logs a traceback for a handler task that ends cancelled).
            # Any other cancellation goes on.
            if not self.stopping.is_set():
                raise
        finally:
            self.connections.discard(task)
            for writer in writers:
                writer.close()

    def close(self) -> None:
        """Stops listening, ends the open connections and waits for the relay's thread."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopping.set)
            self.thread.join(10)
        self.socket.close()

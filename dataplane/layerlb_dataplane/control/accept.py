"""The accept loop of the TCP listeners: every accept error seen, counted and survived without spinning.

Why not `loop.create_server`: uvloop accepts inside libuv, and libuv meets EMFILE with its "EMFILE trick"
(close a reserved descriptor, accept every pending connection and close it at once, reopen the reserve):
clients are cut without a word, nothing is counted or logged, and when the reserve cannot be reopened the
error reaches uvloop, which closes the listening socket for good. Here the loop is ours: `add_reader` on
the listening socket, at most `BATCH` accepts per wake-up (other listeners and connections run between),
and on a resource error (out of descriptors, socket buffers or memory) the error is counted through
`on_error(reason)`, logged at most once per `LOG_INTERVAL` per listener, and accepting stops for a backoff
that doubles from `BACKOFF_FIRST` to `BACKOFF_MAX` while the error lasts. Meanwhile new connections wait
in the kernel's listen backlog (HAProxy does the same when it runs out of descriptors: it pauses the
listener), so they are served once descriptors free, instead of being closed; and the loop sleeps
instead of spinning on a readable socket it cannot accept from.

Each accepted socket becomes a transport through `loop.connect_accepted_socket` (uvloop's, TLS included).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable

log = logging.getLogger("layerlb.accept")

BATCH = 64  # accepts per readable event: a connection flood cannot starve the connections already open
BACKOFF_FIRST = 0.05  # seconds without accepting after the first resource error
BACKOFF_MAX = 1.0
LOG_INTERVAL = 10.0  # at most one log line per listener in this many seconds; the metric counts them all
HANDSHAKE_SECONDS = 10.0  # a TLS client that has not finished its handshake by then is dropped
# Errors that say the process or the host is out of something: stop accepting for a while.
RESOURCE_ERRORS = {
    errno.EMFILE: "EMFILE",
    errno.ENFILE: "ENFILE",
    errno.ENOBUFS: "ENOBUFS",
    errno.ENOMEM: "ENOMEM",
}
# Errors of one connection that died in the backlog (Linux reports them on accept): skip it.
CONNECTION_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})

ProtocolFactory = Callable[[], asyncio.Protocol]


class Acceptor:
    """Accepts on one listening socket for one listener; `close()` stops it and closes the socket."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: ProtocolFactory,
        *,
        name: str,
        context: ssl.SSLContext | None = None,
        on_error: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """`on_error(reason)` counts each accept error (reason EMFILE, ENFILE, ENOBUFS, ENOMEM or other)."""
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.name = name
        self.context = context
        self.on_error = on_error
        self.loop = asyncio.get_running_loop()
        self.backoff = 0.0
        self.resume: asyncio.TimerHandle | None = None
        self.logged_at = -LOG_INTERVAL
        self.unlogged = 0
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections already accepted are not touched)."""
        if self.closed:
            return
        self.closed = True
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self.backoff = 0.0
                return
            except OSError as error:
                if error.errno in CONNECTION_ERRORS:
                    continue
                self._pause(error)
                return
            self.backoff = 0.0
            self._connect(conn)

    def _connect(self, conn: socket.socket) -> None:
        # No TCP_NODELAY here: uvloop's transport sets it (one syscall less per connection).
        if self.context is None:
            task = self.loop.create_task(self._plain(conn))
        else:
            task = self.loop.create_task(self._tls(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _plain(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except OSError:
            conn.close()

    async def _tls(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(
                self.protocol_factory, conn, ssl=self.context, ssl_handshake_timeout=HANDSHAKE_SECONDS
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            conn.close()

    def _pause(self, error: OSError) -> None:
        """A resource error: count it, say so now and then, and stop accepting for a growing while."""
        reason = RESOURCE_ERRORS.get(error.errno or 0, "other")
        self.on_error(reason)
        self.backoff = min(BACKOFF_MAX, self.backoff * 2) if self.backoff else BACKOFF_FIRST
        now = time.monotonic()
        if now - self.logged_at >= LOG_INTERVAL:
            log.warning(
                "%s: cannot accept (%s: %s); accepting again in %.2f s (%d more such errors since the last line)",
                self.name,
                reason,
                error.strerror or error,
                self.backoff,
                self.unlogged,
            )
            self.logged_at = now
            self.unlogged = 0
        else:
            self.unlogged += 1
        self.loop.remove_reader(self.sock.fileno())
        self.resume = self.loop.call_later(self.backoff, self._resume)

    def _resume(self) -> None:
        self.resume = None
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)
            self._accept()

"""The L7 proxy: one `HttpListener` per HTTP/HTTPS listener, over asyncio protocols, built for throughput.

The listener holds what its connections share: the Snapshot-derived settings (computed once per reload,
not per request), the upstream keep-alive pool, session affinity, the connection cap, and the sweeper
that closes idle pooled connections. Each client connection is a `connection.ClientConnection`; `listener` holds what the two know of each
other.

Behaviour, in short:

- Routing: `snapshot.router.match(method, host, path, header)` → `snapshot.pool(name)` → affinity or
  `pool.pick(client_ip, hash_key, exclude)`; `current()` is read per request, so a reload applies to the
  next request of a kept-alive connection while requests in flight finish on their target.
- Errors: no route 404, no usable target 503, a dead backend 502, a slow one 504, a slow client head 408;
  a failed connect of an idempotent request moves to another target (at most 3 tries).
- Passive health: each failed connect and each 502/504 a backend caused counts against its target, and
  an answer of a target with failures counted clears them, through `current().record_passive`
  (`core.state`), the path the L4 relay feeds too.
- Connection cap (`listener.max_connections`, per worker process): connections beyond it are accepted but
  not read until a slot frees, so they wait as the API promises (like HAProxy's maxconn); when as many
  again are already waiting, a further one is answered 503 and closed.
- Per-client cap (`listener.max_connections_per_client`, per worker process, like nginx's `limit_conn`
  on the address or HAProxy's `sc_conn_cur`): a client address holding that many connections (admitted
  or waiting) gets 503 and a close for the next one; trusted PROXY-protocol peers are not counted (their
  clients are many).
- TLS is the runtime's (its accept loop, `control.accept`, wraps each connection); HTTPS listeners send
  `X-Forwarded-Proto: https` and mark the affinity cookie Secure.
- `close(timeout)` drains: idle connections close at once, busy ones after their response.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from layerlb import plan
from layerlb.api import Protocol
from layerlb_dataplane.core import affinity
from layerlb_dataplane.core.metrics import Metrics, RequestSeries
from layerlb_dataplane.core.state import Snapshot
from layerlb_dataplane.http import upstream
from layerlb_dataplane.http.connection import ClientConnection
from layerlb_dataplane.http.exchange import QUEUED
from layerlb_dataplane.http.h1.framing import error_response
from layerlb_dataplane.http.listener import Connection, Settings


class HttpListener:
    """One per listener and updated in place, so a reload never closes it; `protocol_factory` goes to
    the runtime's accept loop, and the listener holds what its connections share."""

    def __init__(self, listener: plan.Listener, current: Callable[[], Snapshot], metrics: Metrics) -> None:
        """`current()` returns the Snapshot to serve each new request from (it changes on reload)."""
        self.listener = listener
        self.name = listener.name
        self.current = current
        self.metrics = metrics
        self.proto = b"https" if listener.protocol == Protocol.HTTPS else b"http"
        self.connections: set[Connection] = set()
        self.admitted = 0
        self.waiting: deque[Connection] = deque()
        # Per-client cap: open connections by client address, and the address each counted one holds.
        self.per_client: dict[str, int] = {}
        self.counted: dict[Connection, str] = {}
        self.pool = upstream.UpstreamPool()
        self.affinity = affinity.Affinity()
        self.closing = False
        # Request counters by backend name (`series`), looked up once per request.
        self.request_series: dict[str, RequestSeries] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._settings: Settings | None = None
        self.sweeper: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None

    def protocol_factory(self) -> asyncio.Protocol:
        """A protocol for a new client connection (called by the accept loop, inside the event loop)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return ClientConnection(self)

    def settings(self) -> Settings:
        """The settings of the current Snapshot (recomputed only when the Snapshot changed)."""
        snapshot = self.current()
        settings = self._settings
        if settings is None or settings.snapshot is not snapshot:
            settings = self._settings = Settings(snapshot)
            if self.loop is not None:  # a reload: idle connections to targets that left close now
                self.pool.sweep(self.loop.time(), settings.timeouts.idle)
        return settings

    def update(self, listener: plan.Listener) -> None:
        """A reload changed this listener's settings (limits, timeouts, PROXY protocol, connection cap).

        Limits and timeouts come from the Plan and apply from each connection's next request; the PROXY
        protocol setting applies to new connections; a higher (or removed) cap admits waiting ones at once.
        """
        self.listener = listener
        self.proto = b"https" if listener.protocol == Protocol.HTTPS else b"http"
        self._admit_waiting()

    async def close(self, timeout: float) -> None:
        """Stop accepting requests on idle connections and wait up to `timeout` for active ones to finish."""
        self.closing = True
        while self.waiting:
            self.waiting.popleft().transport.close()
        for connection in list(self.connections):
            connection.shutdown()
        self.pool.close()
        if self.connections:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._drained.wait()
            except TimeoutError:
                pass
        for connection in list(self.connections):
            connection.transport.abort()
        self.pool.close()
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None

    # --- connection accounting and the cap -----------------------------------------------------------

    def opened(self, connection: Connection) -> bool:
        """Count a new connection: True when it may start, False when it waits for a slot (or was refused)."""
        self.connections.add(connection)
        self.metrics.connection_opened(self.name)
        if self.closing:
            connection.transport.close()
            return False
        limit = self.listener.max_connections_per_client
        if limit is not None and not connection.behind_proxy:
            ip = connection.client_ip
            count = self.per_client.get(ip, 0)
            if count >= limit:
                self.metrics.connection_refused(self.name, "per_client")
                connection.transport.write(
                    error_response(503, "too many connections from this address", close=True)
                )
                connection.transport.close()
                return False
            self.per_client[ip] = count + 1
            self.counted[connection] = ip
        cap = self.listener.max_connections
        if cap is None or self.admitted < cap:
            self.admitted += 1
            return True
        if len(self.waiting) >= cap:
            self.metrics.connection_refused(self.name, "max_connections")
            connection.transport.write(error_response(503, "too many connections", close=True))
            connection.transport.close()
            return False
        self.waiting.append(connection)
        return False

    def closed(self, connection: Connection) -> None:
        """A connection ended: free its slot (a waiting connection may start) and note a finished drain."""
        self.connections.discard(connection)
        self.metrics.connection_closed(self.name)
        ip = self.counted.pop(connection, None)
        if ip is not None:
            left = self.per_client[ip] - 1
            if left:
                self.per_client[ip] = left
            else:
                del self.per_client[ip]
        if connection.admitted:
            self.admitted -= 1
            self._admit_waiting()
        if not self.connections and self._drained is not None:
            self._drained.set()

    def _admit_waiting(self) -> None:
        cap = self.listener.max_connections
        while self.waiting and (cap is None or self.admitted < cap):
            connection = self.waiting.popleft()
            if connection.state == QUEUED:
                self.admitted += 1
                connection.admit()

    # --- what connections share ----------------------------------------------------------------------

    def series(self, backend: str) -> RequestSeries:
        """The request counters of this listener for `backend` ("" for requests no backend took)."""
        series = self.request_series.get(backend)
        if series is None:
            series = self.request_series[backend] = self.metrics.series(self.name, backend)
        return series

    def release(self, connection: upstream.UpstreamConnection) -> None:
        """Return an upstream connection to the pool (or close it when it cannot be reused)."""
        assert self.loop is not None
        if self.pool.release(connection, self.loop.time()) and self.sweeper is None:
            self.schedule_sweep()

    def watch_affinity(self) -> None:
        """ClientIP affinity entries exist: make sure the sweeper expires them."""
        if self.sweeper is None:
            self.schedule_sweep()

    def schedule_sweep(self) -> None:
        """Run `_sweep` soon; pooled connections and affinity entries must not outlive their timeouts."""
        assert self.loop is not None
        idle = self._settings.timeouts.idle if self._settings is not None else 60.0
        self.sweeper = self.loop.call_later(min(1.0, max(0.05, idle / 4)), self._sweep)

    def _sweep(self) -> None:
        """Close pooled connections idle past the idle timeout or to draining targets; expire affinity."""
        assert self.loop is not None
        self.sweeper = None
        now = self.loop.time()
        self.pool.sweep(now, self.settings().timeouts.idle)
        self.affinity.expire(now)
        if (self.pool.count or self.affinity.clients) and not self.closing:
            self.schedule_sweep()

"""The L7 proxy: HTTP/1.1 between clients and backends, over asyncio protocols.

STUB to be completed (issue 3 items 2, 5, 6). The `HttpListener` signature is the contract the runtime
relies on: one per listener, created once and updated in place on reload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from layerlb import plan
from layerlb_dataplane.metrics import Metrics
from layerlb_dataplane.state import Snapshot


class HttpListener:
    """Serves one HTTP/HTTPS listener; `protocol_factory` goes to `loop.create_server`."""

    def __init__(self, listener: plan.Listener, current: Callable[[], Snapshot], metrics: Metrics) -> None:
        """`current()` returns the Snapshot to serve each new request from (it changes on reload)."""
        raise NotImplementedError

    def protocol_factory(self) -> asyncio.Protocol:
        raise NotImplementedError

    def update(self, listener: plan.Listener) -> None:
        """A reload changed this listener's settings (limits, timeouts, PROXY protocol, connection cap)."""
        raise NotImplementedError

    async def close(self, timeout: float) -> None:
        """Stop accepting requests on idle connections and wait up to `timeout` for active ones to finish."""
        raise NotImplementedError

"""Prometheus metrics of the data plane.

STUB to be completed with the admin server (issue 3 item 11). The methods below are what the proxies call;
they must stay cheap (the hot path calls them per request).
"""

from __future__ import annotations


class Metrics:
    """Counters, gauges and histograms of one worker."""

    def connection_opened(self, listener: str) -> None:
        """A client connection was accepted on `listener`."""

    def connection_closed(self, listener: str) -> None:
        """A client connection on `listener` ended."""

    def request_done(self, listener: str, backend: str, status: int, seconds: float) -> None:
        """A request finished with `status` (including layerlb's own 4xx/5xx) after `seconds`."""

    def upstream_failure(self, backend: str, kind: str) -> None:
        """A connect/timeout/reset to a backend: `kind` is connect, timeout or reset."""

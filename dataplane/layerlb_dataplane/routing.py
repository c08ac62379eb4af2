"""L7 routing: which backend a request goes to, from the Plan's routes (already in priority order). Sans-IO.

STUB to be completed (issue 3 item 3): hosts (with/without port, wildcards), path prefix on segment
boundaries, exact path, headers, methods. The interface below is what `state.Snapshot` relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from layerlb import plan


class Router:
    """First matching route wins (the Plan orders them most specific first); else the default backend."""

    def __init__(self, routes: Sequence[plan.Route], default_backend: str | None) -> None:
        self.routes = list(routes)
        self.default_backend = default_backend

    def match(self, method: str, host: str, path: str, header: Callable[[str], str | None]) -> str | None:
        """The backend name for a request, or None (→ 404). `header(name)` takes a lower-case name."""
        return self.default_backend

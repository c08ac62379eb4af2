"""kopf's connection to the API server, with a bounded connection pool.

kopf's own session has no limit on connections (`aiohttp.TCPConnector(limit=0)`): on a cold start over
1,000 LoadBalancers every per-object worker patches at once, each on its own TLS connection with a
256 KiB buffer, and the operator peaked above 500 MB RSS (bench/operator_scale.py). Same credentials as
kopf's default login (in-cluster ServiceAccount, else the kubeconfig), but the pool is bounded: requests
wait for a free connection instead of opening thousands.

Watch streams hold their connection for as long as they run, so the bound leaves room for every stream
kopf opens (one per watched resource and namespace) plus a pool for the requests themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

# The resources kopf watches per namespace (handlers.py: indexes and event handlers), with a margin.
WATCH_STREAMS_PER_NAMESPACE: Final = 12
REQUEST_CONNECTIONS: Final = 32

log = logging.getLogger("layerlb.operator")


def connection_limit(namespaces: Sequence[str]) -> int:
    """The pool size: room for every watch stream plus `REQUEST_CONNECTIONS` for requests."""
    return WATCH_STREAMS_PER_NAMESPACE * max(1, len(namespaces)) + REQUEST_CONNECTIONS


def session_login(limit: int) -> Callable[..., Awaitable[Any]]:
    """kopf's default credentials in an `AiohttpSession` whose connector holds at most `limit` connections."""
    import aiohttp
    import kopf

    async def login(**kwargs: Any) -> Any:
        # Async on purpose: aiohttp's connector must be made on the running loop, not in kopf's thread pool.
        info = kopf.login_via_client(**kwargs)
        if info is None:
            raise kopf.LoginError("no Kubernetes credentials (in-cluster or kubeconfig)")
        auth = info.as_aiohttp_basic_auth() if info.username else None
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
            headers=info.as_http_headers(),
            auth=auth,
        )
        log.debug("kopf connects to %s with at most %d connections", info.server, limit)
        return kopf.AiohttpSession(
            aiohttp_session=session,
            server=info.server,
            default_namespace=info.default_namespace,
            expiration=info.expiration,
        )

    return login


def install(namespaces: Sequence[str]) -> None:
    """Register the login handler with kopf (before `kopf.operator` starts)."""
    import kopf

    kopf.on.login()(session_login(connection_limit(namespaces)))

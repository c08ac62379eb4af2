"""The Python cost of one proxied request, without sockets: `python bench/hotpath.py`.

wrk figures on a shared 2-core machine move by ±10 % with other people's work; this does not. It drives
the L7 proxy's own objects (`HttpListener`, `ClientConnection`, pooled `UpstreamConnection`s) with the
bench's request and an nginx-like response through transports that only count writes, and reports the
process CPU time per request (the best of several passes). What it leaves out (uvloop, the kernel) is
the same before and after a change to the hot path, so it is the figure to compare such changes by;
the bench's `CPU µs/req` column is the whole cost.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path
from typing import Any

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.120:28080\r\n\r\n"  # what wrk sends
RESPONSE = (  # what nginx 1.22 answers with the bench's 21-byte body
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 14:55:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 21\r\nConnection: keep-alive\r\n\r\n"
    b"nginx :1 -----------\n"
)


class CountingTransport:
    """A transport that accepts every write and counts them."""

    def __init__(self) -> None:
        self.writes = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, parts: list[bytes]) -> None:
        self.writes += 1

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.120", 28080)}.get(name, default)


ROUTES = [  # for --routed: the request matches none of them and goes to the default backend
    {
        "match": {"hosts": ["api.example.com"], "pathPrefix": "/v1", "methods": ["GET", "HEAD"]},
        "backend": "web",
    },
    {"match": {"pathPrefix": "/static", "headers": {"X-Canary": "true"}}, "backend": "web"},
]


async def measure(requests: int, connections: int, passes: int, routed: bool = False) -> float:
    """Seconds of process CPU per request, the best of `passes`."""
    from layerlb_dataplane.core.metrics import Metrics
    from layerlb_dataplane.core.state import Registry
    from layerlb_dataplane.http import upstream
    from layerlb_dataplane.http.connection import ClientConnection
    from layerlb_dataplane.http.proxy import HttpListener

    from bench import resources
    from layerlb import api, resolve, validation

    document = resources.l7_proxy("127.0.0.120", 28080, [1, 2])
    if routed:
        document["spec"]["routes"] = ROUTES
    resource = validation.validate(document)
    assert isinstance(resource, api.LoadBalancer)
    current = resolve.resolve(resource, resolve.StaticView())
    snapshot = Registry().snapshot(current)
    listener = HttpListener(current.listeners[0], lambda: snapshot, Metrics())
    listener.loop = asyncio.get_running_loop()
    clients = []
    for _ in range(connections):
        client = ClientConnection(listener)
        client.connection_made(CountingTransport())  # type: ignore[arg-type]
        clients.append(client)
    for pool in snapshot.pools.values():
        for target in pool.targets:
            for _ in range(connections):
                connection = upstream.UpstreamConnection(target)
                connection.connection_made(CountingTransport())  # type: ignore[arg-type]
                listener.pool.release(connection, 0.0)

    def run(rounds: int) -> None:
        for _ in range(rounds):
            for client in clients:
                client.data_received(REQUEST)
                assert client.up is not None, "the request did not reach a pooled upstream connection"
                client.up.data_received(RESPONSE)

    run(100)
    best = float("inf")
    rounds = max(1, requests // connections)
    for _ in range(passes):
        gc.collect()
        started = time.process_time()
        run(rounds)
        best = min(best, (time.process_time() - started) / (rounds * connections))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/hotpath.py", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests per pass (default 100000)")
    parser.add_argument("--connections", type=int, default=50, help="client connections (default 50)")
    parser.add_argument("--passes", type=int, default=7, help="passes; the best counts (default 7)")
    parser.add_argument("--routed", action="store_true", help="with routes (none matches: the default)")
    args = parser.parse_args()
    import uvloop

    seconds = uvloop.run(measure(args.requests, args.connections, args.passes, args.routed))
    what = "with routes" if args.routed else "no routes"
    print(f"L7 hot path, Python only, {what}: {seconds * 1e6:.2f} µs CPU per request (best of {args.passes})")
    return 0


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # run as a script: the repository importable
    sys.exit(main())

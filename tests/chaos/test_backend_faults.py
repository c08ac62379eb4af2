"""Backends that fail under load: health takes them out within the Plan's bounds, and no request is lost
silently (#18, point 2).

`layerlb serve` fronts three real backends (sockets on the test's event loop); one of them turns faulty
while a client sends GETs (three connections) and POSTs (one), each POST with an id the backends record.
The faults, as a backend process shows them to a proxy:

- **killed**: the listener gone (connects refused) and its open connections reset;
- **rst**: it accepts, reads the request, and resets the connection;
- **hung**: it accepts and reads, and never answers (its health probe neither);
- **slow**: it answers, `SLOW` seconds late, within the request timeout;
- **unhealthy**: its health endpoint answers 503 while it still serves requests (a backend draining
  itself): only the active check can see it.

The health settings are the Plan's (`HEALTH`): an HTTP probe every 2 s with a 1 s timeout, out after 2
failures; passive ejection after 5 failures in a row (`core/PASSIVE_THRESHOLD`). So a failing
backend is out (`layerlb_backend_endpoints{state="ready"}` drops) within `interval * unhealthyThreshold +
timeout` = 5 s of failing, whichever of the two notices first (plus `SLACK` for a busy machine), and the
requests that reach it once it fails are at most twice (`PASSIVE_THRESHOLD` + the concurrency), the POSTs
it fails at most that sum once; a slow one that answers in time stays in.

Requests: a GET that meets a refused connect or a reset before any answer is sent to another endpoint and
succeeds (RFC 9110 §9.2.2: idempotent); a GET that meets a hung backend gets 504 after the request timeout
(not resent: the backend may be executing it, as HAProxy's default `retry-on conn-failure`) and there are at
most `PASSIVE_THRESHOLD` + the client's concurrency of those before it is out. A POST is never resent once
sent: it answers 502/503/504 (counted) and a backend saw each POST id at most once.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chaos.dataplane_process import DataplaneProcess
from tests.dataplane.conftest import Backend, LoopThread, Seen, respond
from tests.dataplane.helpers_runtime import free_port, wait_until

VIP = "127.0.0.62"
HEALTH: dict[str, Any] = {
    "protocol": "HTTP",
    "path": "/healthz",
    "intervalSeconds": 2,
    "timeoutSeconds": 1,
    "healthyThreshold": 2,
    "unhealthyThreshold": 2,
}
REQUEST_TIMEOUT = 2.0  # the Plan's timeouts.requestSeconds: a hung backend's GET gets 504 after it
SLOW = 0.3  # a slow backend's delay, well within the request timeout
# What a busy 2-core machine adds to the active bound: the probe loop's and the admin server's scheduling.
SLACK = 3.0
GETTERS = 3
# core/health.PASSIVE_THRESHOLD, as documented: a target is ejected after this many failures in a row.
PASSIVE_THRESHOLD = 5


class FaultyBackend:
    """A real HTTP backend whose behaviour the test switches: ok, slow, hung, rst, killed."""

    def __init__(self, loop_thread: LoopThread, name: str) -> None:
        self.loop_thread = loop_thread
        self.name = name
        self.mode = "ok"
        self.writers: set[asyncio.StreamWriter] = set()
        self.requests: list[Seen] = []  # every request but the health probes
        self.backend = Backend(loop_thread, name, self.handle)
        self.port = self.backend.port

    async def handle(self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        probe = seen.target == "/healthz"
        if not probe:
            self.requests.append(seen)
        if self.mode == "hung":
            await asyncio.Event().wait()  # never set: cancelled when the loop stops
        if self.mode == "rst":
            _reset(writer)
            return
        if self.mode == "slow" and not probe:
            await asyncio.sleep(SLOW)
        if self.mode == "unhealthy" and probe:
            writer.write(respond(503, b"draining"))
            return
        writer.write(respond(body=f"ok {self.name}".encode()))

    def fail(self, mode: str) -> None:
        """Turn faulty; `killed` also closes the listener and resets every open connection, as a process
        that died would have its sockets reset by the kernel."""

        def switch() -> None:
            self.mode = mode
            if mode == "killed":
                assert self.backend.server is not None
                self.backend.server.close()
                for writer in self.writers:
                    _reset(writer)

        self.loop_thread.call(switch)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class Client:
    """GETs on `GETTERS` kept-alive connections and POSTs (each with its own id) on another, counted."""

    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    gets: list[tuple[float, int]] = field(default_factory=list)  # (when it ended, status or 0)
    posts: list[tuple[float, str, int]] = field(default_factory=list)  # (when, id, status or 0)
    ids: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.threads = [threading.Thread(target=self._loop, args=("GET",)) for _ in range(GETTERS)]
        self.threads.append(threading.Thread(target=self._loop, args=("POST",)))
        for thread in self.threads:
            thread.start()

    def _loop(self, method: str) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            connection = connection or http.client.HTTPConnection(VIP, self.port, timeout=30)
            request_id = str(next(self.ids))
            try:
                body = request_id.encode() if method == "POST" else None
                connection.request(method, "/", body=body, headers={"X-Request-Id": request_id})
                answer = connection.getresponse()
                answer.read()
                status = answer.status
                if answer.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException):
                status = 0
                if connection is not None:
                    connection.close()
                connection = None
            if method == "GET":
                self.gets.append((time.monotonic(), status))
            else:
                self.posts.append((time.monotonic(), request_id, status))

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture
def lab(
    tmp_path: Path, loop_thread: LoopThread
) -> Iterator[tuple[DataplaneProcess, list[FaultyBackend], int]]:
    backends = [FaultyBackend(loop_thread, name) for name in ("a", "b", "faulty")]
    port = free_port(VIP)
    document = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "faults", "namespace": "chaos"},
        "spec": {
            "mode": "L7",
            "architecture": "proxy",
            "vip": VIP,
            "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}],
            "backends": [
                {
                    "name": "app",
                    "algorithm": "round-robin",
                    "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends],
                    "healthCheck": HEALTH,
                }
            ],
            "defaultBackend": "app",
            "timeouts": {"connectSeconds": 1.0, "requestSeconds": REQUEST_TIMEOUT},
        },
    }
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(document))
    dataplane = DataplaneProcess(tmp_path, serve=path)
    yield dataplane, backends, port
    dataplane.stop()
    for backend in backends:
        if backend.mode != "killed":
            backend.backend.close()


def _ready(dataplane: DataplaneProcess) -> float | None:
    return dataplane.metric("layerlb_backend_endpoints", backend="app", state="ready")


@pytest.mark.parametrize("fault", ["killed", "rst", "hung", "slow", "unhealthy"])
def test_a_failing_backend_is_taken_out_within_the_health_bounds_and_no_request_is_lost_silently(
    lab: tuple[DataplaneProcess, list[FaultyBackend], int], fault: str
) -> None:
    dataplane, backends, port = lab
    faulty = backends[-1]
    wait_until(lambda: _ready(dataplane) == 3, 30, "three ready endpoints")
    client = Client(port)
    try:
        wait_until(lambda: len(faulty.requests) >= 10, 30, "the faulty backend serving its share")
        failed_at = time.monotonic()
        faulty.fail(fault)
        before = len(faulty.requests)
        if fault == "slow":
            # Slow is not failing: it stays in while the client sees it answer, late, for a while.
            seen = len(faulty.requests)
            wait_until(lambda: len(faulty.requests) >= seen + 10, 60, "slow answers")
            out_after = None
            assert _ready(dataplane) == 3
        else:
            wait_until(lambda: _ready(dataplane) == 2, 60, f"the {fault} backend taken out")
            out_after = time.monotonic() - failed_at
            # After it is out: enough requests to show the rest are all served.
            ended = len(client.gets)
            wait_until(lambda: len(client.gets) >= ended + 30, 60, "requests after the ejection")
            out_at = failed_at + out_after
    finally:
        client.finish()
    gets = Counter(status for _, status in client.gets)
    posts = Counter(status for _, _, status in client.posts)
    received = Counter(
        seen.header("X-Request-Id") for b in backends for seen in b.requests if seen.method == "POST"
    )
    bound: int = HEALTH["intervalSeconds"] * HEALTH["unhealthyThreshold"] + HEALTH["timeoutSeconds"]
    print(
        f"\n{fault}: out after {out_after if out_after is None else round(out_after, 2)} s (bound {bound} s"
        f" + {SLACK:.0f} s slack); {len(faulty.requests) - before} requests reached it since; GETs"
        f" {dict(gets)}; POSTs {dict(posts)}"
    )
    assert all(count == 1 for count in received.values()), "a POST reached a backend twice"
    assert all(received[request_id] == 1 for _, request_id, status in client.posts if status == 200), (
        "an answered POST no backend saw"
    )
    assert set(posts) <= {200, 502, 503, 504}, posts  # never a dropped connection: always an answer
    if fault == "slow":
        assert gets == Counter({200: sum(gets.values())}) and set(posts) == {200}, (gets, posts)
        return
    assert out_after is not None and out_after <= bound + SLACK, f"taken out after {out_after:.2f} s"
    reached = len(faulty.requests) - before
    # Passive ejection stops it: the failures that eject it, the requests already on their way, and each
    # of those at most twice (a pooled connection the backend reset is resent once on a new one). Without
    # passive ejection, the active check alone would let it take its share for seconds (~30 requests/s).
    assert fault == "unhealthy" or reached <= 2 * (PASSIVE_THRESHOLD + GETTERS + 1), reached
    # The POSTs it failed (never resent) are as few: killed (its connects refused) included.
    assert sum(posts.values()) - posts[200] <= PASSIVE_THRESHOLD + GETTERS + 1, posts
    late = [status for when, status in client.gets if when > out_at + REQUEST_TIMEOUT and status != 200]
    assert not late, f"GETs failed after the backend was out: {late}"
    if fault == "hung":
        # Not resent (the backend may be executing it): bounded by passive ejection and the concurrency.
        assert set(gets) <= {200, 504} and gets[504] <= PASSIVE_THRESHOLD + GETTERS, gets
    elif fault == "unhealthy":
        assert set(gets) == {200} and set(posts) == {200}, (gets, posts)
    else:
        assert set(gets) == {200}, f"a GET that met a {fault} backend was not sent elsewhere: {gets}"

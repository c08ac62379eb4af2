"""A deleted LoadBalancer stops accepting at once and drains what is open: a TCP stream keeps flowing and a
request in flight gets its answer, until the drain timeout.

Deleting a LoadBalancer (its Plan leaves the source) is an ordinary change, like a rollout; cutting its
open connections at once would break every client mid-request. Planting exactly that went unseen by the
suite (issue #18): the reload tests drain removed listeners and backends, never a removed LoadBalancer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from tests.dataplane.conftest import TIMEOUT, Backend, LoopThread, RawClient, Seen, TcpBackend, get, respond
from tests.dataplane.helpers_runtime import (
    Running,
    closed_by_peer,
    connect,
    free_port,
    l4_plan,
    listening_inodes,
    read_exactly,
    read_line,
    wait_until,
)
from tests.dataplane.test_runtime import VIP, l7

Backends = Callable[..., Backend]


def test_a_deleted_load_balancers_open_connections_drain(
    loop_thread: LoopThread, tcp: list[TcpBackend], backends: Backends
) -> None:
    release = threading.Event()

    async def slow(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if seen.target == "/slow":
            await asyncio.get_running_loop().run_in_executor(None, release.wait, TIMEOUT)
        writer.write(respond(body=b"finished"))

    web = backends("web", handler=slow)
    l4_port, l7_port = free_port(VIP), free_port(VIP)
    running = Running(
        loop_thread,
        [
            l4_plan(VIP, [("t", l4_port, "TCP")], [tcp[0].port]),
            l7(l7_port, {"web": [("127.0.0.1", web.port)]}),
        ],
        drain_timeout=TIMEOUT,
    )
    stream = connect(VIP, l4_port)
    assert read_line(stream) == b"a\n"
    request = RawClient(l7_port, host=VIP)
    request.send(get("/slow"))
    web.wait(lambda: len(web.requests) == 1)

    running.set([])  # both LoadBalancers deleted

    wait_until(lambda: listening_inodes(VIP, l4_port) == listening_inodes(VIP, l7_port) == [], what="unbound")
    for port in (l4_port, l7_port):
        with pytest.raises(ConnectionRefusedError):
            connect(VIP, port)
    stream.sendall(b"still flowing")
    assert read_exactly(stream, len(b"still flowing")) == b"still flowing"
    release.set()
    answer = request.response()
    assert (answer.status, answer.body) == (200, b"finished")
    assert answer.header("connection") == "close"  # answered, then closed: the LoadBalancer is gone
    assert request.closed()
    stream.close()
    tcp[0].wait(lambda: tcp[0].open == 0)
    assert running.stop() == 0


def test_a_deleted_load_balancers_connections_are_cut_after_the_drain_timeout(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    """The bound on draining: a stream that never ends is cut once the drain timeout passes."""
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port])], drain_timeout=1.0)
    stream = connect(VIP, port)
    assert read_line(stream) == b"a\n"
    running.set([])
    assert closed_by_peer(stream)  # cut (within the 20 s read timeout), the backend's stream still open
    stream.close()
    assert running.stop() == 0

"""The userspace L4 proxy through real sockets: TCP relay (retries, timeouts, half-close, backpressure, caps,
PROXY protocol both ways) and UDP flows (own replies per client, idle expiry, cap)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from typing import TYPE_CHECKING

import pytest
from layerlb_dataplane.control.runtime import Served
from layerlb_dataplane.core import health
from layerlb_dataplane.l4 import relay

from layerlb import api, plan
from tests.dataplane.conftest import TcpBackend, UdpBackend
from tests.dataplane.helpers_runtime import (
    Running,
    closed_by_peer,
    connect,
    free_port,
    l4_plan,
    read_exactly,
    read_line,
    wait_until,
)

if TYPE_CHECKING:
    from tests.dataplane.conftest import LoopThread

VIP = "127.0.0.21"


def served(running: Running, key: str = "test/l4") -> list[Served]:
    return list(running.dataplane.instances[key].served.values())


def test_tcp_relays_both_ways_and_spreads_connections(loop_thread: LoopThread, tcp: list[TcpBackend]) -> None:
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port, tcp[1].port])])
    greetings = []
    for _ in range(4):
        with connect(VIP, port) as client:
            greetings.append(read_line(client))
            client.sendall(b"hello")
            assert read_exactly(client, 5) == b"hello"
    assert sorted(greetings) == [b"a\n", b"a\n", b"b\n", b"b\n"]
    metrics = running.dataplane.instances["test/l4"].metrics
    wait_until(lambda: metrics.relayed.get(("t", "app"), [0])[0] == 4, what="four relays recorded")
    assert metrics.relayed[("t", "app")] == [4, 20, 4 * 2 + 20]
    assert running.stop() == 0


def test_half_close_propagates_and_the_other_direction_goes_on(loop_thread: LoopThread) -> None:
    backend = TcpBackend(loop_thread, "h", eof_reply=b"after your EOF")
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [backend.port])])
    with connect(VIP, port) as client:
        assert read_line(client) == b"h\n"
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert read_exactly(client, len(b"last words" + b"after your EOF")) == b"last wordsafter your EOF"
        assert client.recv(1) == b""  # then the backend's EOF arrives too
    backend.wait(lambda: backend.open == 0)
    running.stop()
    backend.close()


def test_backpressure_keeps_the_proxy_buffer_bounded(loop_thread: LoopThread) -> None:
    """A backend sending 64 MiB to a client that does not read: the proxy stops reading the backend."""
    size = 64 * 1024 * 1024
    chunk = bytes(range(256)) * 256  # 64 KiB
    blocked = threading.Event()

    async def blaster(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(
            high=8 * 1024 * 1024
        )  # so that drain() lets it grow past 4 MiB
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            if writer.transport.get_write_buffer_size() > 4 * 1024 * 1024:
                blocked.set()  # the proxy stopped reading us and the kernel buffers are full
            await writer.drain()
        writer.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(blaster, "127.0.0.1", 0)

    server = loop_thread.run(start())
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [server.sockets[0].getsockname()[1]])])
    with connect(VIP, port) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.recv(1)
        assert blocked.wait(20)
        handler = served(running)[0].handler
        assert isinstance(handler, relay.TcpListener)
        (connection,) = handler.connections
        buffered = loop_thread.call(connection.transport.get_write_buffer_size)
        assert buffered <= relay.HIGH_WATER + 1024 * 1024
        rest = read_exactly(client, size - 1)
    expected = hashlib.sha256(chunk * (size // len(chunk))).hexdigest()
    assert hashlib.sha256(chunk[:1] + rest).hexdigest() == expected
    running.stop()
    loop_thread.call(server.close)


def test_a_failed_connect_is_retried_on_another_target(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    dead = free_port("127.0.0.1")
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [dead, tcp[0].port])])
    for _ in range(3):
        with connect(VIP, port) as client:
            assert read_line(client) == b"a\n"
    assert running.dataplane.instances["test/l4"].metrics.failures[("app", "connect")] >= 1
    running.stop()


def test_a_backend_refusing_connections_is_ejected_avoided_and_taken_back_when_the_ejection_ends(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    """Passive health for TCP, as for L7: refused connects in a row eject the target, new connections no
    longer try it, and once `ejection_seconds` have passed (on a clock the test moves) it is picked again."""
    refusing, port = free_port("127.0.0.1"), free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [refusing, tcp[0].port])])
    inst = running.dataplane.instances["test/l4"]
    metrics = inst.metrics
    now = [1000.0]
    (target,) = [
        t for t in loop_thread.call(lambda: inst.current().pools["app"].targets) if t.port == refusing
    ]
    loop_thread.call(lambda: setattr(target.health, "clock", lambda: now[0]))
    for _ in range(health.PASSIVE_THRESHOLD):  # round-robin tries the refusing target first, then retries
        with connect(VIP, port) as client:
            assert read_line(client) == b"a\n"
    assert metrics.failures[("app", "connect")] == health.PASSIVE_THRESHOLD
    assert loop_thread.call(lambda: target.health.state) == "ejected"

    revived = TcpBackend(loop_thread, "r", port=refusing)  # it answers again, but the ejection still holds
    now[0] += health.EJECTION_SECONDS - 1
    for _ in range(4):
        with connect(VIP, port) as client:
            assert read_line(client) == b"a\n"
    assert metrics.failures[("app", "connect")] == health.PASSIVE_THRESHOLD  # not even tried
    assert revived.accepted == 0

    now[0] += 1
    greetings = []
    for _ in range(4):
        with connect(VIP, port) as client:
            greetings.append(read_line(client))
    assert sorted(greetings) == [b"a\n", b"a\n", b"r\n", b"r\n"]
    assert loop_thread.call(lambda: target.health.state) == "healthy"
    running.stop()
    revived.close()


def test_connect_timeout_closes_the_client(loop_thread: LoopThread) -> None:
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = connect("127.0.0.1", hole.getsockname()[1])  # fills the backlog: later SYNs get no answer
    port = free_port(VIP)
    timeouts = plan.Timeouts(connect=0.3)
    running = Running(
        loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [hole.getsockname()[1]], timeouts=timeouts)]
    )
    with connect(VIP, port) as client:
        assert client.recv(1) == b""
    assert running.dataplane.instances["test/l4"].metrics.failures[("app", "timeout")] == 1
    running.stop()
    filler.close()
    hole.close()


def test_idle_connections_are_closed(loop_thread: LoopThread, tcp: list[TcpBackend]) -> None:
    port = free_port(VIP)
    timeouts = plan.Timeouts(idle=0.3)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port], timeouts=timeouts)])
    with connect(VIP, port) as client:
        assert read_line(client) == b"a\n"
        client.sendall(b"x")
        assert read_exactly(client, 1) == b"x"
        assert closed_by_peer(client)  # the idle close is an abort
    tcp[0].wait(lambda: tcp[0].open == 0)
    running.stop()


def test_connections_beyond_the_cap_wait_for_a_slot(loop_thread: LoopThread, tcp: list[TcpBackend]) -> None:
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port], max_connections=1)])
    first = connect(VIP, port)
    assert read_line(first) == b"a\n"
    second = connect(VIP, port)
    second.settimeout(0.3)
    with pytest.raises(TimeoutError):
        second.recv(1)
    assert tcp[0].accepted == 1
    first.close()
    second.settimeout(20)
    assert read_line(second) == b"a\n"
    second.close()
    running.stop()


@pytest.mark.parametrize("version", [api.ProxyProtocolVersion.v1, api.ProxyProtocolVersion.v2])
def test_proxy_header_sent_to_backends_that_ask(
    loop_thread: LoopThread, tcp: list[TcpBackend], version: api.ProxyProtocolVersion
) -> None:
    port = free_port(VIP)
    running = Running(
        loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port], proxy_protocol=version)]
    )
    with connect(VIP, port) as client:
        source_port = client.getsockname()[1]
        assert read_line(client) == b"a\n"
        client.sendall(b"data")
        tcp[0].wait(lambda: len(tcp[0].first) == 1)
    first = tcp[0].first[0]
    if version is api.ProxyProtocolVersion.v1:
        assert first.startswith(f"PROXY TCP4 127.0.0.1 {VIP} {source_port} {port}\r\n".encode())
    else:
        assert first.startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c")
        assert first[16:28] == socket.inet_aton("127.0.0.1") + socket.inet_aton(VIP) + source_port.to_bytes(
            2, "big"
        ) + port.to_bytes(2, "big")
    running.stop()


def test_proxy_header_accepted_from_trusted_clients_and_passed_on(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    port = free_port(VIP)
    p = l4_plan(
        VIP,
        [("t", port, "TCP")],
        [tcp[0].port],
        trusted=["127.0.0.0/8"],
        proxy_protocol=api.ProxyProtocolVersion.v1,
    )
    running = Running(loop_thread, [p])
    with connect(VIP, port) as client:
        client.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 443\r\nhello")
        assert read_line(client) == b"a\n"
        header = b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 443\r\n"  # what the backend got, echoed
        assert read_exactly(client, len(header) + 5) == header + b"hello"
    with connect(VIP, port) as client:  # a trusted client must send the header
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert closed_by_peer(client)
    running.stop()


def test_a_proxy_header_from_an_untrusted_client_is_refused(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    port = free_port(VIP)
    running = Running(
        loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port], trusted=["10.0.0.0/8"])]
    )
    with connect(VIP, port) as client:  # not trusted: a header would be a forged client address
        client.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 443\r\n")
        received = b""
        try:
            while chunk := client.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
        assert received in (b"", b"a\n")  # closed, with at most the greeting: the header never went on
    with connect(VIP, port) as client:
        assert read_line(client) == b"a\n"
        assert echo_once(client) == b"plain data"
    running.stop()


def echo_once(client: socket.socket) -> bytes:
    client.sendall(b"plain data")
    return read_exactly(client, 10)


# --- UDP ----------------------------------------------------------------------------------------------------


def _udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(20)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_udp_clients_each_get_their_own_replies_and_flows_expire(loop_thread: LoopThread) -> None:
    backends = [UdpBackend(loop_thread, name) for name in ("u1", "u2")]
    port = free_port(VIP, socket.SOCK_DGRAM)
    timeouts = plan.Timeouts(idle=0.3)
    p = l4_plan(VIP, [("dns", port, "UDP")], [b.port for b in backends], timeouts=timeouts)
    running = Running(loop_thread, [p])
    clients = [_udp_client() for _ in range(6)]
    names: dict[int, set[bytes]] = {}
    for round_ in range(3):
        for index, client in enumerate(clients):
            client.sendto(f"c{index} r{round_}".encode(), (VIP, port))
        for index, client in enumerate(clients):
            data, source = client.recvfrom(2048)
            assert source == (VIP, port)  # the reply comes from the address the client wrote to
            name, _, payload = data.partition(b":")
            assert payload == f"c{index} r{round_}".encode()
            names.setdefault(index, set()).add(name)
    assert all(len(seen) == 1 for seen in names.values())  # a flow keeps its backend
    assert {name for seen in names.values() for name in seen} == {b"u1", b"u2"}
    (udp,) = served(running)
    assert isinstance(udp.handler, relay.UdpListener)
    handler = udp.handler
    wait_until(lambda: loop_thread.call(lambda: len(handler.flows)) == 0, what="flows expired")
    metrics = running.dataplane.instances["test/l4"].metrics
    assert metrics.active["dns"] == 0 and metrics.accepted["dns"] == 6
    assert loop_thread.call(
        lambda: [t.active for t in running.dataplane.instances["test/l4"].current().pools["app"].targets]
    ) == [0, 0]
    clients[0].sendto(b"again", (VIP, port))  # a new flow after expiry
    assert clients[0].recvfrom(2048)[0].endswith(b":again")
    for client in clients:
        client.close()
    running.stop()
    for backend in backends:
        backend.close()


def test_udp_flows_are_capped(loop_thread: LoopThread) -> None:
    backend = UdpBackend(loop_thread, "u")
    port = free_port(VIP, socket.SOCK_DGRAM)
    running = Running(loop_thread, [l4_plan(VIP, [("dns", port, "UDP")], [backend.port])])
    (udp,) = served(running)
    assert isinstance(udp.handler, relay.UdpListener)
    udp.handler.max_flows = 2
    clients = [_udp_client() for _ in range(3)]
    for client in clients[:2]:
        client.sendto(b"in", (VIP, port))
        assert client.recvfrom(2048)[0] == b"u:in"
    clients[2].settimeout(0.3)
    clients[2].sendto(b"over", (VIP, port))
    with pytest.raises(TimeoutError):
        clients[2].recvfrom(2048)
    assert udp.handler.dropped == 1
    for client in clients:
        client.close()
    running.stop()
    backend.close()


def test_a_udp_listeners_max_connections_caps_its_flows(loop_thread: LoopThread) -> None:
    backend = UdpBackend(loop_thread, "u")
    port = free_port(VIP, socket.SOCK_DGRAM)
    running = Running(loop_thread, [l4_plan(VIP, [("dns", port, "UDP")], [backend.port], max_connections=2)])
    (udp,) = served(running)
    handler = udp.handler
    assert isinstance(handler, relay.UdpListener)
    clients = [_udp_client() for _ in range(3)]
    for client in clients[:2]:
        client.sendto(b"in", (VIP, port))
        assert client.recvfrom(2048)[0] == b"u:in"
    clients[2].sendto(b"over", (VIP, port))
    wait_until(lambda: handler.dropped == 1, what="the third flow refused")
    assert len(handler.flows) == 2
    for client in clients:
        client.close()
    running.stop()
    backend.close()

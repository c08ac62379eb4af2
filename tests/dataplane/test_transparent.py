"""Transparent proxying in network namespaces: the backend must see the client's address, and only the
routing `setup_routing` installs brings the backend's replies back to the proxy.

Topology (IPv4 and IPv6 side by side):

    client 10.0.1.2 / fd00:1::2 ── eth0 ┐            ┌ eth1 ── backend 10.0.2.2 / fd00:2::2
                                  lb 10.0.1.1 / fd00:1::1, 10.0.2.1 / fd00:2::1
                                                      (the backend's default route is via the LB)

The LB runs a small asyncio relay whose upstream sockets come from `transparent.bound_socket(client_ip)`,
as the HTTP proxy's do. The LB does not forward packets (forwarding off): without the routing, the
backend's SYN-ACK to the client's address is dropped and the upstream connect times out.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest
from layerlb_dataplane.net import transparent

from tests.netns import PREFIX, Namespace, RemoteError, Topology, remove_stale

CLIENT = {4: "10.0.1.2", 6: "fd00:1::2"}
LB_FRONT = {4: "10.0.1.1", 6: "fd00:1::1"}
LB_BACK = {4: "10.0.2.1", 6: "fd00:2::1"}
BACKEND = {4: "10.0.2.2", 6: "fd00:2::2"}
RELAY_PORT, BACKEND_PORT = 9000, 8080
CONNECT_TIMEOUT = 1.0


# ---- functions that run inside the namespaces (module level, so tests.netns can import them there) ----


def backend_server(port: int) -> None:
    """Answers each connection with the peer address it sees and the line it received."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        line = await reader.readline()
        writer.write(json.dumps({"peer": peer[0], "got": line.decode().strip()}).encode() + b"\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, None, port)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def relay(port: int, backends: dict[int, str], backend_port: int, connect_timeout: float) -> None:
    """A transparent TCP relay: the upstream connection leaves from the client's own address."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client_ip = writer.get_extra_info("peername")[0]
        version = ipaddress.ip_address(client_ip).version
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        upstream = transparent.bound_socket(client_ip, family)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(
                loop.sock_connect(upstream, (backends[version], backend_port)), connect_timeout
            )
        except (OSError, TimeoutError) as error:
            print(f"failed {client_ip} {type(error).__name__}", flush=True)
            upstream.close()
            writer.close()
            return
        print(f"connected {client_ip} from {upstream.getsockname()[0]}", flush=True)
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        up_writer.close()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, None, port)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def request(address: str, port: int, message: str) -> dict[str, str] | None:
    """One request through the relay; None when the relay closed without an answer."""
    with socket.create_connection((address, port), timeout=10) as sock:
        sock.sendall(message.encode() + b"\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    answer: dict[str, str] | None = json.loads(reply) if reply else None
    return answer


def routing_state() -> dict[str, str]:
    """What setup_routing may change, as text, to compare runs."""

    def out(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return done.stdout + done.stderr

    return {
        "rules4": out("ip", "-4", "rule", "show"),
        "rules6": out("ip", "-6", "rule", "show"),
        "routes4": out("ip", "-4", "route", "show", "table", "all"),
        "routes6": out("ip", "-6", "route", "show", "table", "all"),
        "nft": out("nft", "list", "ruleset"),
    }


def socket_facts() -> dict[str, object]:
    """bound_socket's options, and that binding a foreign address needs them (a plain socket cannot)."""
    facts: dict[str, object] = {}
    with transparent.bound_socket("203.0.113.5", socket.AF_INET) as sock:
        facts["v4"] = (
            sock.getsockname()[0],
            sock.getsockopt(socket.SOL_IP, transparent.IP_TRANSPARENT),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
            sock.getblocking(),
            sock.type == socket.SOCK_STREAM,
        )
    with transparent.bound_socket("2001:db8::5", socket.AF_INET6) as sock:
        facts["v6"] = (
            sock.getsockname()[0],
            sock.getsockopt(socket.IPPROTO_IPV6, transparent.IPV6_TRANSPARENT),
            sock.getblocking(),
        )
    with transparent.bound_socket("::ffff:203.0.113.6", socket.AF_INET) as sock:
        facts["mapped"] = sock.getsockname()[0]
    with socket.socket() as plain:
        try:
            plain.bind(("203.0.113.5", 0))
            facts["plain"] = "bound"
        except OSError as error:
            facts["plain"] = errno.errorcode[error.errno or 0]
    try:
        transparent.bound_socket("2001:db8::5", socket.AF_INET).close()
        facts["mismatch"] = "accepted"
    except ValueError:
        facts["mismatch"] = "refused"
    return facts


def pause() -> None:
    """A background process that only ends when stopped."""
    print("ready", flush=True)
    signal.pause()


def boom() -> None:
    raise KeyError("boom")


# ---- tests --------------------------------------------------------------------------------------------


@pytest.fixture
def topology() -> Iterator[Topology]:
    with Topology("tproxy") as topo:
        yield topo


def test_bound_socket(topology: Topology) -> None:
    facts = topology.namespace("sock").call(socket_facts)
    assert facts == {
        "v4": ("203.0.113.5", 1, 1, False, True),
        "v6": ("2001:db8::5", 1, False),
        "mapped": "203.0.113.6",
        "plain": "EADDRNOTAVAIL",  # the control: without IP_TRANSPARENT a foreign address cannot be bound
        "mismatch": "refused",
    }


def test_setup_routing_is_idempotent_and_teardown_removes_it(topology: Topology) -> None:
    lb = topology.namespace("lb")
    pristine = lb.call(routing_state)
    lb.call(transparent.setup_routing)
    once = lb.call(routing_state)
    assert "fwmark 0x1/0x1 lookup 100" in once["rules4"]
    assert "fwmark 0x1/0x1 lookup 100" in once["rules6"]
    assert "local default dev lo table 100" in once["routes4"]
    assert "local default dev lo table 100" in once["routes6"]
    assert "socket transparent 1 meta mark set meta mark | 0x00000001 accept" in once["nft"]
    lb.call(transparent.setup_routing)
    assert lb.call(routing_state) == once
    lb.call(transparent.setup_routing, 0x40, 200)  # a second mark and table live beside the first
    other = lb.call(routing_state)
    assert "fwmark 0x40/0x40 lookup 200" in other["rules4"]
    assert "fwmark 0x1/0x1 lookup 100" in other["rules4"]
    lb.call(transparent.teardown_routing, 0x40, 200)
    lb.call(transparent.teardown_routing)
    lb.call(transparent.teardown_routing)  # nothing left to remove is not an error
    assert lb.call(routing_state) == pristine
    with pytest.raises(RemoteError, match="ValueError"):
        lb.call(transparent.setup_routing, 0, 100)


def build(topology: Topology) -> tuple[Namespace, Namespace, Namespace]:
    client, lb, backend = (topology.namespace(name) for name in ("client", "lb", "backend"))
    topology.link(client, "eth0", lb, "eth0")
    topology.link(lb, "eth1", backend, "eth0")
    for version, prefix in ((4, 24), (6, 64)):
        nodad = ["nodad"] if version == 6 else []
        client.ip("addr", "add", f"{CLIENT[version]}/{prefix}", "dev", "eth0", *nodad)
        lb.ip("addr", "add", f"{LB_FRONT[version]}/{prefix}", "dev", "eth0", *nodad)
        lb.ip("addr", "add", f"{LB_BACK[version]}/{prefix}", "dev", "eth1", *nodad)
        backend.ip("addr", "add", f"{BACKEND[version]}/{prefix}", "dev", "eth0", *nodad)
        backend.ip(f"-{version}", "route", "add", "default", "via", LB_BACK[version])
    lb.sysctl("net.ipv4.ip_forward", 0)
    lb.sysctl("net.ipv6.conf.all.forwarding", 0)
    return client, lb, backend


@pytest.mark.parametrize("version", [4, 6])
def test_backend_sees_the_client_and_replies_return_through_the_lb(topology: Topology, version: int) -> None:
    client, lb, backend = build(topology)
    # The backend's only way to the client is its default route via the LB: no link, no other route.
    assert f"via {LB_BACK[version]}" in backend.ip(f"-{version}", "route", "get", CLIENT[version])
    backend.spawn(backend_server, BACKEND_PORT).wait_for_line("ready")
    proxy = lb.spawn(relay, RELAY_PORT, BACKEND, BACKEND_PORT, CONNECT_TIMEOUT)
    proxy.wait_for_line("ready")

    # (c) without the routing, the backend's reply to the client's address never reaches the relay
    assert client.call(request, LB_FRONT[version], RELAY_PORT, "first") is None
    assert proxy.wait_for_line("failed ") == f"failed {CLIENT[version]} TimeoutError"

    # (a) + (b) with it, the request round-trips and the backend's peer is the client itself
    lb.call(transparent.setup_routing)
    answer = client.call(request, LB_FRONT[version], RELAY_PORT, "second")
    assert proxy.wait_for_line("connected ") == f"connected {CLIENT[version]} from {CLIENT[version]}"
    assert answer == {"peer": CLIENT[version], "got": "second"}
    assert client.call(request, LB_FRONT[version], RELAY_PORT, "third") == {
        "peer": CLIENT[version],
        "got": "third",
    }

    # and it is the routing that does it: removed, connections fail again
    lb.call(transparent.teardown_routing)
    assert client.call(request, LB_FRONT[version], RELAY_PORT, "fourth") is None
    assert proxy.wait_for_line("failed ") == f"failed {CLIENT[version]} TimeoutError"


def namespaces() -> set[str]:
    return {
        line.split()[0]
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if line.strip()
    }


def test_topology_cleans_up_even_when_the_test_fails() -> None:
    """The helper's promise to other suites: a failing test leaves no namespace and no process behind."""
    with pytest.raises(RuntimeError, match="the test failed"), Topology("cleanup") as topo:
        a, b = topo.namespace("a"), topo.namespace("b")
        topo.link(a, "eth0", b, "eth0")
        a.addr("eth0", "10.9.0.1/24")
        worker = a.spawn(pause)
        worker.wait_for_line("ready")
        created = {a.name, b.name}
        assert created <= namespaces()
        with pytest.raises(RemoteError, match="KeyError: 'boom'"):
            b.call(boom)
        raise RuntimeError("the test failed")
    assert not created & namespaces()
    assert worker.process.returncode is not None

    dead_pid = subprocess.Popen(["true"])  # a pid that no longer runs: what a killed run leaves
    dead_pid.wait()
    stale = f"{PREFIX}-{dead_pid.pid}-1-stale-x"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in remove_stale()
    assert stale not in namespaces()

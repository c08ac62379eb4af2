"""The forwarding process in place: reloads that keep sockets and connections, drains, rejections, kernel
seams, bind failures, graceful stop, and the Plan sources that feed it (real sockets throughout)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from layerlb_dataplane.control import config, runtime

from layerlb import api, cli, plan
from layerlb.render import formats
from tests.dataplane.helpers_runtime import (
    Running,
    closed_by_peer,
    connect,
    free_port,
    l4_plan,
    listening_inodes,
    make_certificate,
    read_exactly,
    read_line,
    wait_until,
)

if TYPE_CHECKING:
    from tests.dataplane.conftest import Backend, LoopThread, Seen

from tests.dataplane.conftest import RawClient, TcpBackend, get, lb_document, plan_of, respond

VIP = "127.0.0.22"


def echo(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    return read_exactly(sock, len(data))


# --- reloads of L4 Plans ---------------------------------------------------------------------------------


def test_reload_keeps_the_listening_socket_and_a_long_lived_connection(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port])])
    inodes = listening_inodes(VIP, port)
    assert len(inodes) == 1
    long_lived = connect(VIP, port)
    assert read_line(long_lived) == b"a\n"
    for generation in range(2, 6):  # several reloads, each moving new traffic
        backend = tcp[generation % 2 + 1]
        running.set([l4_plan(VIP, [("t", port, "TCP")], [backend.port], generation=generation)])
        assert echo(long_lived) == b"ping"  # (c) the old connection goes on, on its old target
        with connect(VIP, port) as fresh:
            assert read_line(fresh) == f"{backend.name}\n".encode()
        assert listening_inodes(VIP, port) == inodes  # (e) the same socket, never re-bound
    long_lived.close()
    assert running.stop() == 0


def test_a_removed_backend_drains_while_new_connections_go_elsewhere(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port])])
    old = connect(VIP, port)
    assert read_line(old) == b"a\n"
    running.set([l4_plan(VIP, [("t", port, "TCP")], [tcp[1].port], generation=2)])
    inst = running.dataplane.instances["test/l4"]
    (draining,) = loop_thread.call(lambda: list(inst.registry.draining()))
    assert (draining.port, draining.active) == (tcp[0].port, 1)
    for _ in range(3):
        with connect(VIP, port) as fresh:
            assert read_line(fresh) == b"b\n"
    assert echo(old, b"still here") == b"still here"  # (d) the existing connection finishes its work
    old.close()
    tcp[0].wait(lambda: tcp[0].open == 0)
    wait_until(
        lambda: loop_thread.call(lambda: list(inst.registry.draining())) == [], what="target forgotten"
    )
    running.stop()


def test_listeners_added_and_removed_by_a_reload(loop_thread: LoopThread, tcp: list[TcpBackend]) -> None:
    first, second = free_port(VIP), free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("one", first, "TCP")], [tcp[0].port])])
    on_first = connect(VIP, first)
    assert read_line(on_first) == b"a\n"
    running.set([l4_plan(VIP, [("two", second, "TCP")], [tcp[0].port], generation=2)])
    with connect(VIP, second) as client:
        assert read_line(client) == b"a\n"
    with pytest.raises(ConnectionRefusedError):
        connect(VIP, first)
    assert echo(on_first) == b"ping"  # the removed listener's open connection drains
    on_first.close()
    running.stop()


def test_a_plan_that_cannot_bind_is_rejected_and_the_old_one_keeps_serving(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    port = free_port(VIP)
    taken = socket.socket()
    taken.bind((VIP, 0))
    taken.listen()
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port])])
    extra = ("x", taken.getsockname()[1], "TCP")
    running.set([l4_plan(VIP, [("t", port, "TCP"), extra], [tcp[1].port], generation=2)])
    assert running.problems == [
        f"test/l4 generation 2 not applied: cannot listen on {VIP}:{extra[1]}/TCP (test/l4 listener x): "
        "the port is already in use; the previous Plan keeps serving"
    ]
    with connect(VIP, port) as client:
        assert read_line(client) == b"a\n"  # the old Plan, untouched
    assert running.dataplane.ready() == (False, running.problems)
    taken.close()
    running.set([l4_plan(VIP, [("t", port, "TCP"), extra], [tcp[1].port], generation=2)])  # retried: now free
    assert running.dataplane.ready() == (True, [])
    with connect(VIP, extra[1]) as client:
        assert read_line(client) == b"b\n"
    running.stop()


def test_kernel_architectures_serve_nothing_and_the_others_go_on(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    port = free_port(VIP)
    kernel = l4_plan(
        "127.0.0.23", [("k", 80, "TCP")], [tcp[1].port], name="dsr", architecture=api.Architecture.dsr
    )
    running = Running(loop_thread, [kernel, l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port])])
    with connect(VIP, port) as client:
        assert read_line(client) == b"a\n"
    ready, problems = running.dataplane.ready()
    assert not ready
    assert problems == [
        "test/dsr: the kernel engine for architecture dsr is not available yet: serving nothing for it"
    ]
    running.stop()


def test_a_kernel_engine_plugs_into_the_engines_seam(loop_thread: LoopThread, tcp: list[TcpBackend]) -> None:
    applied: list[int] = []

    class Engine:
        async def apply(self, snapshot: Any) -> None:
            applied.append(snapshot.generation)

        async def close(self, remove: bool = False) -> None:
            applied.append(-2 if remove else -1)

    async def run() -> None:
        p = l4_plan(
            "127.0.0.23", [("k", 80, "TCP")], [tcp[1].port], name="nat", architecture=api.Architecture.nat
        )
        dataplane = runtime.Dataplane(
            config.StaticSource([p]), engines={api.Architecture.nat: lambda _: Engine()}
        )
        assert await dataplane.apply([p]) is None
        assert dataplane.ready() == (True, [])
        await dataplane.apply([p.model_copy(update={"generation": 2})])
        await dataplane.stop(1)

    loop_thread.run(run())
    assert applied == [1, 2, -1]  # process stop: kernel state stays for the next process to adopt


def test_a_kernel_engines_warning_reaches_the_source_and_leaves_the_pod_ready(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    """Strict ARP that could not be set is for the user to hear (the operator's StrictARP condition), but
    the VIP is forwarded: the pod stays ready and reports what it serves."""
    reports: list[tuple[dict[str, int], list[str]]] = []

    class Source(config.StaticSource):
        def applied(self, serving: Mapping[str, int], warnings: Sequence[str] = ()) -> None:
            reports.append((dict(serving), list(warnings)))

    class Engine:
        warnings: tuple[str, ...] = ("strict ARP: eth0 answers",)

        async def apply(self, snapshot: Any) -> None:
            return None

        async def close(self, remove: bool = False) -> None:
            return None

    engine = Engine()

    async def run() -> None:
        p = l4_plan(
            "127.0.0.23", [("k", 80, "TCP")], [tcp[1].port], name="nat", architecture=api.Architecture.nat
        )
        dataplane = runtime.Dataplane(Source([p]), engines={api.Architecture.nat: lambda _: engine})
        assert await dataplane.apply([p]) is None
        assert dataplane.ready() == (True, [])
        engine.warnings = ()  # fixed on the node; the next apply reports it gone
        await dataplane.apply([p.model_copy(update={"generation": 2})])
        await dataplane.stop(1)

    loop_thread.run(run())
    assert reports == [({"test/nat": 1}, ["strict ARP: eth0 answers"]), ({"test/nat": 2}, [])]


def test_a_kernel_engine_removes_its_state_only_when_the_load_balancer_goes(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    calls: list[str] = []

    class Engine:
        async def apply(self, snapshot: Any) -> None:
            calls.append("apply")

        async def close(self, remove: bool = False) -> None:
            calls.append("remove" if remove else "close")

    async def run() -> None:
        p = l4_plan(
            "127.0.0.23", [("k", 80, "TCP")], [tcp[1].port], name="nat", architecture=api.Architecture.nat
        )
        dataplane = runtime.Dataplane(
            config.StaticSource([p]), engines={api.Architecture.nat: lambda _: Engine()}
        )
        assert await dataplane.apply([p]) is None
        assert await dataplane.apply([]) is None  # the LoadBalancer left the source
        await dataplane.stop(1)

    loop_thread.run(run())
    assert calls == ["apply", "remove"]


def test_bind_failures_at_start_exit_1_with_one_line(loop_thread: LoopThread, tcp: list[TcpBackend]) -> None:
    async def start(p: plan.Plan) -> tuple[int, str | None]:
        dataplane = runtime.Dataplane(config.StaticSource([p]), signals=())
        problems: list[str] = []
        dataplane.on_applied = problems.extend
        code = await dataplane.run()
        return code, problems[0] if problems else None

    absent = l4_plan("192.0.2.1", [("t", 8080, "TCP")], [tcp[0].port])
    code, line = loop_thread.run(start(absent))
    assert code == 1
    assert line == "cannot listen on 192.0.2.1:8080/TCP (test/l4 listener t): the address is not on this host"
    with socket.socket() as taken:
        taken.bind((VIP, 0))
        taken.listen()
        code, line = loop_thread.run(
            start(l4_plan(VIP, [("t", taken.getsockname()[1], "TCP")], [tcp[0].port]))
        )
    assert code == 1 and line is not None and line.endswith("the port is already in use")


def test_two_loadbalancers_on_one_address_are_refused() -> None:
    one = l4_plan(VIP, [("t", 9999, "TCP")], [1], name="one")
    two = l4_plan(VIP, [("u", 9999, "TCP"), ("v", 9999, "UDP")], [1], name="two")
    with pytest.raises(config.InvalidConfig) as refused:
        runtime.check([one, two])
    assert refused.value.lines == [f"test/two: listener u: {VIP}:9999/TCP is also a listener of test/one"]


def test_graceful_stop_drains_then_aborts_after_the_timeout(
    loop_thread: LoopThread, tcp: list[TcpBackend]
) -> None:
    port = free_port(VIP)
    running = Running(loop_thread, [l4_plan(VIP, [("t", port, "TCP")], [tcp[0].port])], drain_timeout=1.0)
    client = connect(VIP, port)
    assert read_line(client) == b"a\n"
    loop_thread.call(running.dataplane.request_stop)
    wait_until(lambda: listening_inodes(VIP, port) == [], what="listener closed")
    assert echo(client) == b"ping"  # in flight: still served while draining
    assert running.future.result(20) == 0
    assert closed_by_peer(client)  # cut after the drain timeout
    client.close()


# --- reloads of L7 Plans (through proxy_http.HttpListener) -------------------------------------------------


def l7(port: int, backends: dict[str, list[tuple[str, int]]], generation: int = 1) -> plan.Plan:
    document = lb_document(backends, listener={"port": port}, vip=VIP, generation=generation)
    return plan_of(document)


def test_http_keep_alive_and_in_flight_requests_survive_a_reload(
    loop_thread: LoopThread, backends: Any
) -> None:
    release = threading.Event()

    async def slow(request: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if request.target == "/slow":
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 20)
        writer.write(respond(body=f"old {request.target}".encode()))

    old: Backend = backends("old", slow)
    new: Backend = backends("new")
    port = free_port(VIP)
    running = Running(loop_thread, [l7(port, {"app": [("127.0.0.1", old.port)]})])
    inodes = listening_inodes(VIP, port)
    idle = RawClient(port, VIP)
    idle.send(get("/first"))
    assert idle.response().body == b"old /first"
    busy = RawClient(port, VIP)
    busy.send(get("/slow"))
    old.wait(lambda: any(seen.target == "/slow" for seen in old.requests))
    running.set([l7(port, {"app": [("127.0.0.1", new.port)]}, generation=2)])
    release.set()
    assert busy.response().body == b"old /slow"  # (b) the in-flight request completes
    idle.send(get("/second"))
    assert idle.response().body == b"ok new"  # (a) the idle connection's next request: the new Plan
    assert listening_inodes(VIP, port) == inodes
    idle.close()
    busy.close()
    running.stop()


def test_an_invalid_file_change_keeps_the_old_plan_serving(
    loop_thread: LoopThread, backends: Any, tmp_path: Path
) -> None:
    first: Backend = backends("first")
    second: Backend = backends("second")
    port = free_port(VIP)
    document = lb_document({"app": [("127.0.0.1", first.port)]}, listener={"port": port}, vip=VIP)
    del document["metadata"]["generation"]
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(document))
    loads = []

    class Counting(cli.YamlFiles):
        def load(self) -> list[plan.Plan]:
            try:
                return super().load()
            finally:
                loads.append(1)

    running = Running(loop_thread, Counting([str(path)], poll_seconds=0.02))
    client = RawClient(port, VIP)
    client.send(get())
    assert client.response().body == b"ok first"
    path.write_text("spec: [this is not\n")
    wait_until(lambda: len(loads) >= 2, what="the change noticed")
    client.send(get())
    assert client.response().body == b"ok first"  # (f) nothing changed, nothing dropped
    assert running.dataplane.ready() == (True, [])
    document["spec"]["backends"][0]["endpoints"][0]["port"] = second.port
    path.write_text(yaml.safe_dump(document))
    running.wait_applied(2)
    client.send(get())
    assert client.response().body == b"ok second"
    assert running.dataplane.plans()[0].generation == 2  # numbered by the source
    client.close()
    running.stop()


# --- the sources --------------------------------------------------------------------------------------------


def test_plan_file_reads_what_render_writes(tmp_path: Path) -> None:
    one, two = (
        l4_plan(VIP, [("t", 1, "TCP")], [1], name="one"),
        l4_plan(VIP, [("t", 2, "TCP")], [1], name="two"),
    )
    path = tmp_path / "plan.json"
    path.write_text(formats.dataplane(one) + formats.dataplane(two))  # what `render a.yaml b.yaml` prints
    assert config.PlanFile([str(path)]).load() == [one, two]
    path.write_text(json.dumps([one.model_dump(mode="json")]))
    assert config.PlanFile([str(path)]).load() == [one]
    path.write_text('{"name": "x", "namespace": "y"}')
    with pytest.raises(config.InvalidConfig) as invalid:
        config.PlanFile([str(path)]).load()
    assert f"{path}: Plan/y/x: generation: Field required" in invalid.value.lines


def test_file_sources_reload_on_content_change_only(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    p = l4_plan(VIP, [("t", 1, "TCP")], [1])
    path.write_text(formats.dataplane(p))
    source = config.PlanFile([str(path)], poll_seconds=0.01)
    source.load()

    async def changed_within(seconds: float) -> bool:
        try:
            await asyncio.wait_for(source.changed(), seconds)
        except TimeoutError:
            return False
        return True

    path.write_text(formats.dataplane(p))  # rewritten, same bytes: a new mtime, no change
    assert not asyncio.run(changed_within(0.2))
    path.write_text(formats.dataplane(p.model_copy(update={"generation": 7})))
    assert asyncio.run(changed_within(10))
    assert source.load()[0].generation == 7


def _served_name(port: int) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((VIP, port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="shop.example.com") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        subject = subprocess.run(
            ["openssl", "x509", "-inform", "DER", "-noout", "-subject"],
            input=der,
            capture_output=True,
            check=True,
        )
        return subject.stdout.decode().strip().rsplit("=", 1)[-1].strip()


def test_a_reload_swaps_certificates_without_closing_the_https_listener(
    loop_thread: LoopThread, backends: Any, tmp_path: Path
) -> None:
    web: Backend = backends("web")
    port = free_port(VIP)
    base = l7(port, {"app": [("127.0.0.1", web.port)]})

    def https(certificate: plan.Certificate, generation: int) -> plan.Plan:
        listener = base.listeners[0].model_copy(
            update={"protocol": api.Protocol.HTTPS, "certificates": (certificate,)}
        )
        return base.model_copy(update={"listeners": (listener,), "generation": generation})

    running = Running(loop_thread, [https(make_certificate(tmp_path, "one", []), 1)])
    inodes = listening_inodes(VIP, port)
    assert _served_name(port) == "one"
    running.set([https(make_certificate(tmp_path, "two", []), 2)])
    assert _served_name(port) == "two"
    assert listening_inodes(VIP, port) == inodes
    running.stop()

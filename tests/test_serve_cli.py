"""`layerlb serve` and `layerlb dataplane` as an operator runs them: a real process with real backends,
readiness, traffic, reloads by SIGHUP and by file change, several workers, graceful exit, and the errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from tests.dataplane.conftest import (
    Backend,
    LoopThread,
    RawClient,
    Seen,
    TcpBackend,
    UdpBackend,
    get,
    respond,
)
from tests.dataplane.helpers_runtime import free_port, http_get, read_line, wait_until

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0
VIP = "127.0.0.25"


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "LAYERLB_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "dataplane"), env.get("PYTHONPATH")])
    )
    return env


class Serve:
    """A `layerlb` data plane process; stderr goes to a file so that it never blocks on a full pipe."""

    started: ClassVar[list[Serve]] = []

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.log = tmp_path / f"layerlb-{time.monotonic_ns()}.log"
        self.admin_port = free_port("127.0.0.1")
        self.output = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "layerlb.cli", *args, "--admin", f"127.0.0.1:{self.admin_port}"],
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=_env(),
        )
        Serve.started.append(self)

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def text(self) -> str:
        return self.log.read_text()

    def get(self, path: str) -> tuple[int, str]:
        try:
            return http_get(self.admin + path, timeout=5)
        except OSError:
            return 0, ""

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"exited with {self.process.returncode}:\n{self.text()}"
            return self.get("/readyz")[0] == 200

        wait_until(ready, TIMEOUT, "ready")

    def metric(self, name: str, **labels: str) -> float | None:
        pattern = re.compile(r"^" + re.escape(name) + r"\{(.*)\} (\S+)$")
        for line in self.get("/metrics")[1].splitlines():
            match = pattern.match(line)
            if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
                return float(match.group(2))
        return None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(TIMEOUT)
        self.output.close()
        assert "Traceback" not in self.text(), self.text()
        return code


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """A failing test must not leave its data plane running (and holding its ports)."""
    before = set(Serve.started)
    yield
    for serve in set(Serve.started) - before:
        if serve.process.poll() is None:
            serve.process.kill()
            serve.process.wait(TIMEOUT)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def l7_document(port: int, web: int, api: int) -> dict[str, Any]:
    """examples/l7-proxy-routes.yaml on our VIP, port and backends."""
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "l7-proxy-routes.yaml").read_text())
    spec = document["spec"]
    spec["vip"] = VIP
    spec["listeners"][0]["port"] = port
    ports = {"web": web, "api": api, "canary": api}
    for backend in spec["backends"]:
        backend["endpoints"] = [{"address": "127.0.0.1", "port": ports[backend["name"]]}]
        backend.pop("healthCheck", None)
    return document


def test_serve_l7_reloads_on_sighup_and_exits_0_on_sigterm(tmp_path: Path, loop_thread: LoopThread) -> None:
    web, api, other = Backend(loop_thread, "web"), Backend(loop_thread, "api"), Backend(loop_thread, "other")
    port = free_port(VIP)
    path = tmp_path / "shop.yaml"
    document = l7_document(port, web.port, api.port)
    path.write_text(yaml.safe_dump(document))
    serve = Serve(tmp_path, "serve", str(path), "--poll-interval", "3600")  # reload by SIGHUP only
    serve.wait_ready()
    client = RawClient(port, VIP)
    client.send(get("/v1/items", host="api.example.com"))
    assert client.response().body == b"ok api"
    client.send(get("/", host="www.example.com"))
    assert client.response().body == b"ok web"
    document["spec"]["backends"][0]["endpoints"][0]["port"] = other.port  # web moves
    path.write_text(yaml.safe_dump(document))
    serve.signal(signal.SIGHUP)
    wait_until(lambda: serve.metric("layerlb_plan_generation") == 2, TIMEOUT, "generation 2")
    client.send(get("/", host="www.example.com"))  # the same keep-alive connection
    assert client.response().body == b"ok other"
    assert serve.metric("layerlb_requests_total", backend="web", code_class="2xx") == 2
    client.close()
    assert serve.stop() == 0
    for backend in (web, api, other):
        backend.close()


def test_serve_l4_tcp_and_udp_reloads_when_the_file_changes(tmp_path: Path, loop_thread: LoopThread) -> None:
    one, two = TcpBackend(loop_thread, "one"), TcpBackend(loop_thread, "two")
    resolver = UdpBackend(loop_thread, "dns")
    tcp_port, udp_port = free_port(VIP), free_port(VIP, socket.SOCK_DGRAM)
    tcp_doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "l4-proxy-tcp.yaml").read_text())
    tcp_doc["spec"].update(vip=VIP, listeners=[{"name": "echo", "port": tcp_port, "protocol": "TCP"}])
    tcp_doc["spec"]["backends"][0].update(endpoints=[{"address": "127.0.0.1", "port": one.port}])
    udp_doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "l4-proxy-udp.yaml").read_text())
    udp_doc["spec"].update(vip=VIP, listeners=[{"name": "dns", "port": udp_port, "protocol": "UDP"}])
    udp_doc["spec"]["backends"][0].update(endpoints=[{"address": "127.0.0.1", "port": resolver.port}])
    path = tmp_path / "l4.yaml"
    path.write_text(yaml.safe_dump_all([tcp_doc, udp_doc]))
    serve = Serve(tmp_path, "serve", str(path), "--poll-interval", "0.1")
    serve.wait_ready()
    long_lived = socket.create_connection((VIP, tcp_port), timeout=20)
    assert read_line(long_lived) == b"one\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(20)
        udp.sendto(b"q", (VIP, udp_port))
        assert udp.recvfrom(100) == (b"dns:q", (VIP, udp_port))
    tcp_doc["spec"]["backends"][0].update(endpoints=[{"address": "127.0.0.1", "port": two.port}])
    path.write_text(yaml.safe_dump_all([tcp_doc, udp_doc]))
    wait_until(
        lambda: serve.metric("layerlb_plan_generation", loadbalancer="demo/tcp-echo") == 2, TIMEOUT, "reload"
    )
    with socket.create_connection((VIP, tcp_port), timeout=20) as fresh:
        assert read_line(fresh) == b"two\n"
    long_lived.sendall(b"still")
    assert long_lived.recv(5) == b"still"
    long_lived.close()
    assert serve.stop() == 0
    for backend in (one, two):
        backend.close()
    resolver.close()


def _worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def _established_by_pid(port: int) -> dict[int, int]:
    """How many established connections to local `port` each process holds (from `ss -tnp`)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def _two_workers_echo(tmp_path: Path, backend: TcpBackend) -> tuple[int, dict[str, Any], Path, Serve]:
    """`layerlb serve --workers 2` of the L4 example on a free port of VIP, relaying to `backend`."""
    port = free_port(VIP)
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "l4-proxy-tcp.yaml").read_text())
    document["spec"].update(vip=VIP, listeners=[{"name": "echo", "port": port, "protocol": "TCP"}])
    document["spec"]["backends"][0].update(endpoints=[{"address": "127.0.0.1", "port": backend.port}])
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(document))
    return port, document, path, Serve(tmp_path, "serve", str(path), "--workers", "2")


def test_two_workers_share_the_listener_and_a_crashed_one_is_restarted(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    backend = TcpBackend(loop_thread, "one")
    port, document, path, serve = _two_workers_echo(tmp_path, backend)
    serve.wait_ready()
    workers = _worker_pids(serve.process.pid)
    assert len(workers) == 2
    clients = [socket.create_connection((VIP, port), timeout=20) for _ in range(24)]
    for client in clients:
        assert read_line(client) == b"one\n"
    by_pid = _established_by_pid(port)
    assert set(by_pid) == set(workers), by_pid  # both workers accepted connections
    # Merged over workers; a worker that answers the scrape late (a busy machine) is counted from its last
    # report, so the sum is waited for rather than read once.
    wait_until(
        lambda: serve.metric("layerlb_connections_active", listener="echo") == 24, TIMEOUT, "24 connections"
    )
    for client in clients:
        client.close()
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: "layerlb_worker_restarts_total 1" in serve.get("/metrics")[1], TIMEOUT, "restart")
    serve.wait_ready()
    assert len(_worker_pids(serve.process.pid)) == 2 and workers[0] not in _worker_pids(serve.process.pid)
    with socket.create_connection((VIP, port), timeout=20) as client:
        assert read_line(client) == b"one\n"
    two = TcpBackend(loop_thread, "two")
    document["spec"]["backends"][0].update(endpoints=[{"address": "127.0.0.1", "port": two.port}])
    path.write_text(yaml.safe_dump(document))
    serve.signal(signal.SIGHUP)  # the parent reloads and pushes the Plan to every worker
    wait_until(lambda: serve.metric("layerlb_plan_generation") == 2, TIMEOUT, "both workers on generation 2")
    serve.wait_ready()
    for _ in range(8):
        with socket.create_connection((VIP, port), timeout=20) as client:
            assert read_line(client) == b"two\n"
    assert serve.stop() == 0
    backend.close()
    two.close()


def test_a_worker_whose_loop_stops_answering_makes_the_process_unready_until_it_answers_again(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    """Ready means every worker answers: a stopped worker still holds its SO_REUSEPORT socket and the kernel
    keeps handing it new connections, which would wait unanswered behind a Ready pod."""
    from layerlb_dataplane.control.workers import UNRESPONSIVE_SECONDS

    backend = TcpBackend(loop_thread, "one")
    *_, serve = _two_workers_echo(tmp_path, backend)
    serve.wait_ready()
    stopped = _worker_pids(serve.process.pid)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        moment = time.monotonic()
        wait_until(
            lambda: serve.get("/readyz")[0] == 503 and "has not answered" in serve.get("/readyz")[1],
            UNRESPONSIVE_SECONDS + TIMEOUT,
            "unready while a worker is stopped",
        )
        assert time.monotonic() - moment >= UNRESPONSIVE_SECONDS - 1  # not at the first late answer
    finally:
        os.kill(stopped, signal.SIGCONT)
    serve.wait_ready()
    assert _worker_pids(serve.process.pid)[0] == stopped  # the same worker, answering again: no restart
    assert serve.stop() == 0
    backend.close()


def test_workers_share_one_prober_and_all_follow_its_verdicts(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    """Three workers, one prober (the parent): each backend gets one probe per interval, not three, and
    every worker stops sending to a backend the probes found down, and sends to it again once it is up."""
    sick = threading.Event()
    probed: dict[str, list[float]] = {"a": [], "b": []}

    def handler(name: str) -> Any:
        async def answer(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if seen.target == "/healthz":
                probed[name].append(time.monotonic())
                writer.write(respond(500 if name == "b" and sick.is_set() else 200))
            else:
                writer.write(respond(body=name.encode()))

        return answer

    a, b = Backend(loop_thread, "a", handler("a")), Backend(loop_thread, "b", handler("b"))
    port = free_port(VIP)
    check = {"protocol": "HTTP", "path": "/healthz", "intervalSeconds": 2, "timeoutSeconds": 1}
    document = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "probed", "namespace": "default", "generation": 1},
        "spec": {
            "mode": "L7",
            "architecture": "proxy",
            "vip": VIP,
            "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}],
            "backends": [
                {
                    "name": "web",
                    "endpoints": [
                        {"address": "127.0.0.1", "port": a.port},
                        {"address": "127.0.0.1", "port": b.port},
                    ],
                    "healthCheck": {**check, "healthyThreshold": 1, "unhealthyThreshold": 1},
                }
            ],
            "defaultBackend": "web",
        },
    }
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(document))
    serve = Serve(tmp_path, "serve", str(path), "--workers", "3")
    serve.wait_ready()
    assert len(_worker_pids(serve.process.pid)) == 3

    def answers(count: int) -> set[bytes]:
        """Who answers `count` requests, each on a new connection (the kernel spreads them over workers)."""
        seen = set()
        for _ in range(count):
            client = RawClient(port, VIP)
            client.send(get("/"))
            seen.add(client.response().body)
            client.sock.close()
        return seen

    wait_until(lambda: len(probed["a"]) >= 4, TIMEOUT, "four probes of a")
    # One prober probes every 2 s: four probes span three intervals. Three probers would send four within
    # one interval (each starts within a quarter interval, then every 2 s).
    assert probed["a"][3] - probed["a"][0] >= 2.5 * 2, probed["a"]
    assert answers(24) == {b"a", b"b"}
    sick.set()
    wait_until(lambda: answers(12) == {b"a"}, TIMEOUT, "b taken out")
    assert answers(36) == {b"a"}  # by every worker: any one without the verdict would send half to b
    sick.clear()
    wait_until(lambda: b"b" in answers(12), TIMEOUT, "b back")
    assert serve.stop() == 0
    assert "Traceback" not in serve.text()
    a.close()
    b.close()


def test_dataplane_runs_from_a_plan_file(tmp_path: Path, loop_thread: LoopThread) -> None:
    backend = TcpBackend(loop_thread, "one")
    port = free_port(VIP)
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "l4-proxy-tcp.yaml").read_text())
    document["spec"].update(vip=VIP, listeners=[{"name": "echo", "port": port, "protocol": "TCP"}])
    document["spec"]["backends"][0].update(endpoints=[{"address": "127.0.0.1", "port": backend.port}])
    source = tmp_path / "lb.yaml"
    source.write_text(yaml.safe_dump(document))
    rendered = subprocess.run(
        [sys.executable, "-m", "layerlb.cli", "render", "--format", "dataplane", str(source)],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
        timeout=TIMEOUT,
    )
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(rendered.stdout)
    serve = Serve(tmp_path, "dataplane", "--plan", str(plan_path))
    serve.wait_ready()
    with socket.create_connection((VIP, port), timeout=20) as client:
        assert read_line(client) == b"one\n"
    status, body = serve.get("/config")
    assert status == 200 and json.loads(body)[0]["name"] == "tcp-echo"
    assert serve.stop() == 0
    backend.close()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "layerlb.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=TIMEOUT,
    )
    assert "Traceback" not in done.stdout + done.stderr
    return done


def test_an_invalid_file_exits_2_with_the_validate_lines() -> None:
    bad = str(ROOT / "examples" / "invalid" / "engine-nftables-tunnel.yaml")
    served = _run("serve", bad)
    assert served.returncode == 2
    assert served.stderr == _run("validate", bad).stderr


def test_an_address_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((VIP, 0))
        taken.listen()
        port = taken.getsockname()[1]
        document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "l4-proxy-tcp.yaml").read_text())
        document["spec"].update(vip=VIP, listeners=[{"name": "echo", "port": port, "protocol": "TCP"}])
        path = tmp_path / "lb.yaml"
        path.write_text(yaml.safe_dump(document))
        for workers in ("1", "2"):
            done = _run("serve", str(path), "--workers", workers)
            assert done.returncode == 1
            assert done.stderr.splitlines() == [
                f"layerlb: cannot listen on {VIP}:{port}/TCP (demo/tcp-echo listener echo): the port is already in use"
            ], done.stderr

"""The admin server over real HTTP: liveness, readiness, a Prometheus exposition that parses, and /config
without private keys; plus the metrics arithmetic (buckets, merging workers)."""

from __future__ import annotations

import json
import re
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerlb_dataplane.control import admin
from layerlb_dataplane.core import metrics

from layerlb import api, documents, plan
from tests.dataplane.conftest import RawClient, TcpBackend, get, lb_document, plan_of
from tests.dataplane.helpers_runtime import (
    Running,
    connect,
    free_port,
    http_get,
    l4_plan,
    read_line,
)

if TYPE_CHECKING:
    from tests.dataplane.conftest import Backend, LoopThread

VIP = "127.0.0.24"
ROOT = Path(__file__).resolve().parents[2]

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A strict reader of the text format 0.0.4: families by TYPE, series by sorted labels; asserts on junk."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types, line
            types[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, body, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no TYPE line before it"
        labels: list[tuple[str, str]] = []
        position = 0
        while body and position < len(body):
            label = LABEL.match(body, position)
            assert label, f"bad labels in {line!r}"
            labels.append((label.group(1), label.group(2)))
            position = label.end()
        key = tuple(sorted(labels))
        assert key not in series.setdefault(name, {}), f"duplicate series {line!r}"
        series[name][key] = float(value)
    for name, kind in types.items():
        if kind == "histogram":
            check_histogram(name, series)
    return series


def check_histogram(name: str, series: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> None:
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for labels, value in series.get(f"{name}_bucket", {}).items():
        common = tuple(pair for pair in labels if pair[0] != "le")
        le = dict(labels)["le"]
        buckets.setdefault(common, []).append((float(le), value))
    for common, rows in buckets.items():
        rows.sort()
        counts = [count for _, count in rows]
        assert counts == sorted(counts), f"{name}: buckets not cumulative"
        assert rows[-1][0] == float("inf") and rows[-1][1] == series[f"{name}_count"][common]
        assert common in series[f"{name}_sum"]


def test_health_readiness_metrics_and_config(loop_thread: LoopThread, backends: Any) -> None:
    web: Backend = backends("web")
    echo = TcpBackend(loop_thread, "e")
    http_port, tcp_port = free_port(VIP), free_port(VIP)
    l7 = plan_of(lb_document({"app": [("127.0.0.1", web.port)]}, listener={"port": http_port}, vip=VIP))
    l4 = l4_plan(VIP, [("t", tcp_port, "TCP")], [echo.port])
    running = Running(loop_thread, [l7, l4], admin=True)
    url = running.admin_url
    assert http_get(f"{url}/healthz") == (200, "ok\n")
    assert http_get(f"{url}/readyz") == (200, "ready\n")
    client = RawClient(http_port, VIP)
    for path in ("/a", "/b", "/c"):
        client.send(get(path))
        assert client.response().status == 200
    client.close()
    with connect(VIP, tcp_port) as sock:
        assert read_line(sock) == b"e\n"
        sock.sendall(b"12345")
        sock.recv(5)
    status, text = http_get(f"{url}/metrics")
    assert status == 200
    series = parse(text)
    lb7 = ("loadbalancer", "default/test")
    assert (
        series["layerlb_requests_total"][
            (("backend", "app"), ("code_class", "2xx"), ("listener", "http"), lb7)
        ]
        == 3
    )
    assert (
        series["layerlb_request_duration_seconds_count"][(("backend", "app"), ("listener", "http"), lb7)] == 3
    )
    assert series["layerlb_backend_endpoints"][(("backend", "app"), lb7, ("state", "ready"))] == 1
    assert series["layerlb_plan_generation"][(lb7,)] == 1
    lb4 = ("loadbalancer", "test/l4")
    assert series["layerlb_connections_total"][(("listener", "t"), lb4)] == 1
    with urllib.request.urlopen(f"{url}/metrics", timeout=20) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    status, body = http_get(f"{url}/config")
    assert status == 200
    assert [(p["namespace"], p["name"]) for p in json.loads(body)] == [("default", "test"), ("test", "l4")]
    assert http_get(f"{url}/nope")[0] == 404
    running.stop()
    echo.close()


def test_readyz_is_503_with_the_reasons_until_the_plan_is_applied(loop_thread: LoopThread) -> None:
    kernel = l4_plan(VIP, [("k", 80, "TCP")], [1], name="tun", architecture=api.Architecture.tunnel)
    running = Running(loop_thread, [kernel], admin=True)
    status, body = http_get(f"{running.admin_url}/readyz")
    assert (status, body) == (
        503,
        "test/tun: the kernel engine for architecture tunnel is not available yet: serving nothing for it\n",
    )
    running.stop()


def test_config_redacts_private_keys_of_https_listeners(loop_thread: LoopThread, backends: Any) -> None:
    web: Backend = backends("web")
    resolved, errors = documents.plans(documents.load([str(ROOT / "examples" / "l7-https.yaml")]))
    assert not errors
    https_port, http_port = free_port(VIP), free_port(VIP)
    example = resolved[0][1]
    listeners = tuple(
        listener.model_copy(
            update={"port": https_port if listener.protocol == api.Protocol.HTTPS else http_port}
        )
        for listener in example.listeners
    )
    backend = plan.Backend(
        name="shop",
        algorithm=api.Algorithm.round_robin,
        endpoints=(plan.Endpoint(address="127.0.0.1", port=web.port, weight=1),),
    )
    p = example.model_copy(update={"vip": VIP, "listeners": listeners, "backends": (backend,)})
    running = Running(loop_thread, [p], admin=True)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((VIP, https_port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="shop.example.com") as tls,
    ):
        tls.sendall(get(extra="Connection: close\r\n"))
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok web")
    status, body = http_get(f"{running.admin_url}/config")
    assert status == 200 and "PRIVATE KEY" not in body
    (served,) = json.loads(body)
    https = next(listener for listener in served["listeners"] if listener["protocol"] == "HTTPS")
    assert https["certificates"][0]["key_pem"] == "REDACTED"
    assert "BEGIN CERTIFICATE" in https["certificates"][0]["cert_pem"]
    running.stop()


def test_histogram_buckets_and_label_escaping() -> None:
    recorder = metrics.Metrics()
    for seconds in (0.0001, 0.0005, 0.003, 0.7, 100.0):
        recorder.request_done("l", 'we"ird\\name', 200, seconds)
    series = parse(metrics.render([("ns/x", recorder.dump())]))
    labels = (("backend", 'we\\"ird\\\\name'), ("listener", "l"), ("loadbalancer", "ns/x"))
    buckets = series["layerlb_request_duration_seconds_bucket"]

    def bucket(le: str) -> float:
        return buckets[tuple(sorted((*labels, ("le", le))))]

    assert bucket("0.0005") == 2  # le is inclusive
    assert bucket("0.005") == 3
    assert bucket("60.0") == 4
    assert bucket("+Inf") == 5
    assert abs(series["layerlb_request_duration_seconds_sum"][labels] - 100.7036) < 1e-9


def test_merging_workers_adds_counters_and_keeps_gauges_conservative() -> None:
    one, two = metrics.Metrics(), metrics.Metrics()
    one.request_done("l", "b", 503, 0.01)
    two.request_done("l", "b", 503, 0.02)
    two.request_done("l", "b", 200, 0.02)
    one.connection_opened("l")
    two.connection_opened("l")
    two.upstream_failure("b", "connect")
    first = {**one.dump(), "endpoints": [["b", 2, 3]], "generation": 4}
    second = {**two.dump(), "endpoints": [["b", 3, 3]], "generation": 5}
    series = parse(metrics.render([("ns/x", metrics.merge([first, second]))]))
    lb = ("loadbalancer", "ns/x")
    assert (
        series["layerlb_requests_total"][(("backend", "b"), ("code_class", "5xx"), ("listener", "l"), lb)]
        == 2
    )
    assert (
        series["layerlb_requests_total"][(("backend", "b"), ("code_class", "2xx"), ("listener", "l"), lb)]
        == 1
    )
    assert series["layerlb_request_duration_seconds_count"][(("backend", "b"), ("listener", "l"), lb)] == 3
    assert series["layerlb_connections_active"][(("listener", "l"), lb)] == 2
    assert series["layerlb_upstream_failures_total"][(("backend", "b"), ("kind", "connect"), lb)] == 1
    assert series["layerlb_backend_endpoints"][(("backend", "b"), lb, ("state", "ready"))] == 2
    assert series["layerlb_plan_generation"][(lb,)] == 4


def test_admin_addresses() -> None:
    assert admin.parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert admin.parse_address("[::1]:9100") == ("::1", 9100)
    assert admin.parse_address(":9100") == ("127.0.0.1", 9100)
    for bad in ("9100", "host:port", "h:70000"):
        try:
            admin.parse_address(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")

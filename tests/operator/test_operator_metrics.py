"""The operator exposes Prometheus metrics and a health check over plain HTTP."""

from __future__ import annotations

import asyncio

import pytest
from layerlb_operator import main, metrics


def test_metrics_count_reconciles_by_result_and_load_balancers_by_condition() -> None:
    registry = metrics.Metrics(vips=lambda: 3)
    registry.reconciled("shop/a", "accepted", "True", "False")
    registry.reconciled("shop/a", "accepted", "True", "False")
    registry.reconciled("shop/b", "unresolvable", "False", "False")
    registry.writes["ConfigMap"] += 2
    text = registry.render()
    assert 'layerlb_operator_reconciles_total{result="accepted"} 2' in text
    assert 'layerlb_operator_reconciles_total{result="invalid"} 0' in text
    assert 'layerlb_operator_loadbalancers{accepted="True",ready="False"} 1' in text
    assert 'layerlb_operator_loadbalancers{accepted="False",ready="False"} 1' in text
    assert 'layerlb_operator_writes_total{kind="ConfigMap"} 2' in text
    assert "layerlb_operator_vips_allocated 3" in text
    assert "layerlb_operator_leader 0" in text
    registry.forget("shop/b")
    assert 'accepted="False"' not in registry.render()


def test_the_server_answers_metrics_and_healthz() -> None:
    async def get(port: int, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        return data

    async def scenario() -> list[bytes]:
        server = await metrics.serve(metrics.Metrics(), "127.0.0.1", 0, healthy=lambda: True)
        port = server.sockets[0].getsockname()[1]
        try:
            return [await get(port, path) for path in ("/metrics", "/healthz", "/nope")]
        finally:
            server.close()

    answers = asyncio.run(scenario())
    assert answers[0].startswith(b"HTTP/1.1 200 OK") and b"layerlb_operator_leader" in answers[0]
    assert answers[1].startswith(b"HTTP/1.1 200 OK") and answers[1].endswith(b"ok\n")
    assert answers[2].startswith(b"HTTP/1.1 404")


def test_metrics_addresses_are_host_and_port() -> None:
    assert metrics.parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert metrics.parse_address("[::1]:9") == ("::1", 9)
    with pytest.raises(ValueError, match="not HOST:PORT"):
        metrics.parse_address("8080")


def test_the_lease_defaults_to_the_operators_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "layerlb-system")
    assert main.lease_location("layerlb-operator") == ("layerlb-system", "layerlb-operator")
    assert main.lease_location("ops/leader") == ("ops", "leader")

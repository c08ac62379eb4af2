"""The parts of `resolve` its mutation run showed untested: which TLS Secret a problem names, what makes a
Secret's PEM pair acceptable, the default backend, a missing generation, and dsr/tunnel endpoints' ports."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from layerlb import api, plan, resolve
from tests.test_resolve import _lb

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def secret(name: str = "pair", **fields: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, **fields}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_each_missing_tls_secret_is_named_by_its_own_field() -> None:
    tls = {"secretName": "main", "extraSecretNames": ["first", "second", "third", "fourth"]}
    view = resolve.StaticView(
        secrets={
            ("demo", name): secret(name, stringData={"tls.crt": PEM_CERT, "tls.key": PEM_KEY})
            for name in ("first", "third")
        }
    )
    resource = _lb(listeners=[{"name": "https", "port": 8443, "protocol": "HTTPS", "tls": tls}])
    with pytest.raises(resolve.Unresolvable) as caught:
        resolve.resolve(resource, view)
    assert [p.path for p in caught.value.problems] == [
        "spec.listeners[0].tls.secretName",
        "spec.listeners[0].tls.extraSecretNames[1]",
        "spec.listeners[0].tls.extraSecretNames[3]",
    ]


@pytest.mark.parametrize(
    ("fields", "accepted"),
    [
        ({"stringData": {"tls.crt": PEM_CERT, "tls.key": PEM_KEY}}, True),
        ({"data": {"tls.crt": b64(PEM_CERT.encode()), "tls.key": b64(PEM_KEY.encode())}}, True),
        ({"data": {"tls.crt": "no pem", "tls.key": b64(PEM_KEY.encode())}}, False),  # not base64
        ({"data": {"tls.crt": b64(PEM_CERT.encode()) + "!", "tls.key": b64(PEM_KEY.encode())}}, False),
        ({"data": {"tls.crt": b64(PEM_CERT.encode()), "tls.key": b64(b"\xff\xfe")}}, False),  # not UTF-8
        ({"stringData": {"tls.crt": "a certificate, not PEM", "tls.key": PEM_KEY}}, False),
        ({"stringData": {"tls.crt": PEM_CERT, "tls.key": "a key, not PEM"}}, False),
        ({"stringData": {"tls.crt": PEM_CERT}}, False),
        ({"stringData": {"tls.key": PEM_KEY}}, False),
        ({"stringData": {"tls.crt": PEM_CERT}, "data": {"tls.key": b64(PEM_KEY.encode())}}, True),
    ],
    ids=[
        "stringData",
        "data",
        "data-not-base64",
        "data-trailing-garbage",
        "key-not-utf8",
        "cert-not-pem",
        "key-not-pem",
        "no-key",
        "no-cert",
        "mixed",
    ],
)
def test_a_secret_needs_a_pem_certificate_and_key(fields: dict[str, Any], accepted: bool) -> None:
    path = "spec.listeners[0].tls.secretName"
    if accepted:
        certificate = resolve.certificate_from_secret(secret(**fields), path)
        assert (certificate.cert_pem, certificate.key_pem) == (PEM_CERT, PEM_KEY)
        assert certificate.source == "Secret/pair"
        return
    with pytest.raises(resolve.Unresolvable) as caught:
        resolve.certificate_from_secret(secret(**fields), path)
    assert caught.value.reason == "InvalidCertificate"
    assert [p.path for p in caught.value.problems] == [path]


def test_string_data_wins_over_data_as_the_api_server_would_store_it() -> None:
    fields: dict[str, Any] = {
        "stringData": {"tls.crt": PEM_CERT, "tls.key": PEM_KEY},
        "data": {"tls.crt": b64(b"stale"), "tls.key": b64(b"stale")},
    }
    assert resolve.certificate_from_secret(secret(**fields), "p").cert_pem == PEM_CERT


def test_an_l4_plan_without_a_default_takes_its_first_backend_and_l7_has_none() -> None:
    two = [
        {"name": "first", "endpoints": [{"address": "127.0.0.1", "port": 9001}]},
        {"name": "second", "endpoints": [{"address": "127.0.0.1", "port": 9002}]},
    ]
    l4 = _lb(
        mode="L4",
        listeners=[{"name": "t", "port": 9000, "protocol": "TCP"}],
        backends=two,
        defaultBackend="second",
    )
    l4.spec.defaultBackend = None
    assert resolve.resolve(l4, resolve.StaticView()).default_backend == "first"
    l7 = _lb(
        backends=two, routes=[{"match": {"pathPrefix": "/a"}, "backend": "second"}], defaultBackend="first"
    )
    l7.spec.defaultBackend = None
    assert resolve.resolve(l7, resolve.StaticView()).default_backend is None


def test_a_resource_without_a_generation_resolves_to_generation_zero() -> None:
    resource = _lb()
    resource.metadata.generation = None
    assert resolve.resolve(resource, resolve.StaticView()).generation == 0


class ServiceView(resolve.StaticView):
    """Static, except that every Service has two endpoints with their target ports."""

    def service_endpoints(self, namespace: str, service: api.ServiceRef, path: str) -> list[plan.Endpoint]:
        return [
            plan.Endpoint(address="10.0.0.2", port=8443, weight=1),
            plan.Endpoint(address="10.0.0.1", port=8080, weight=1),
        ]


@pytest.mark.parametrize(
    ("architecture", "ports"),
    [("proxy", [8080, 8443]), ("nat", [8080, 8443]), ("dsr", [None, None]), ("tunnel", [None, None])],
)
def test_dsr_and_tunnel_send_to_the_vip_port_so_service_endpoints_lose_theirs(
    architecture: str, ports: list[int | None]
) -> None:
    resource = _lb(
        mode="L4",
        architecture=architecture,
        listeners=[{"name": "t", "port": 443, "protocol": "TCP"}],
        backends=[{"name": "app", "service": {"name": "shop", "port": 443}}],
    )
    endpoints = resolve.resolve(resource, ServiceView()).backend("app").endpoints
    assert [e.address for e in endpoints] == ["10.0.0.1", "10.0.0.2"]  # sorted by address
    assert [e.port for e in endpoints] == ports


def test_routes_that_differ_only_in_methods_put_the_one_with_methods_first() -> None:
    backends = [
        {"name": n, "endpoints": [{"address": "127.0.0.1", "port": 9000 + i}]} for i, n in enumerate("ab")
    ]
    routes = [
        {"match": {"pathPrefix": "/v1"}, "backend": "a"},
        {"match": {"pathPrefix": "/v1", "methods": ["POST"]}, "backend": "b"},
    ]
    result = resolve.resolve(_lb(backends=backends, routes=routes, defaultBackend="a"), resolve.StaticView())
    assert [r.backend for r in result.routes] == ["b", "a"]


class RecordingView(ServiceView):
    """Remembers the namespace each Service was looked up in."""

    def __init__(self) -> None:
        super().__init__()
        self.namespaces: list[str] = []

    def service_endpoints(self, namespace: str, service: api.ServiceRef, path: str) -> list[plan.Endpoint]:
        self.namespaces.append(namespace)
        return [
            plan.Endpoint(address="10.0.0.1", port=9002, weight=1),
            plan.Endpoint(address="10.0.0.1", port=9001, weight=1),
        ]


def test_services_are_looked_up_in_the_resources_namespace_else_default_and_sorted_by_port() -> None:
    view = RecordingView()
    resource = _lb(backends=[{"name": "app", "service": {"name": "shop", "port": 80}}])
    endpoints = resolve.resolve(resource, view).backend("app").endpoints
    resource.metadata.namespace = None
    resolve.resolve(resource, view)
    assert view.namespaces == ["demo", "default"]
    assert [e.port for e in endpoints] == [9001, 9002]  # one address: by port

"""`resolve` turns a validated LoadBalancer into a Plan, and says clearly what it could not resolve."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from layerlb import api, plan, resolve, validation


def _lb(**spec: Any) -> api.LoadBalancer:
    base: dict[str, Any] = {
        "mode": "L7",
        "architecture": "proxy",
        "vip": "127.0.0.10",
        "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
        "backends": [{"name": "app", "endpoints": [{"address": "127.0.0.1", "port": 9001}]}],
        "defaultBackend": "app",
    }
    base.update(spec)
    document = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "demo", "generation": 3},
        "spec": base,
    }
    resource = validation.validate(document)
    assert isinstance(resource, api.LoadBalancer)
    return resource


def test_a_static_l7_resource_resolves_to_a_complete_plan() -> None:
    result = resolve.resolve(_lb(), resolve.StaticView())
    assert result.version == plan.PLAN_VERSION
    assert (result.namespace, result.name, result.generation) == ("demo", "web", 3)
    assert result.engine is None
    assert result.backend("app").endpoints == (plan.Endpoint(address="127.0.0.1", port=9001, weight=1),)
    assert result.listeners[0].transport == "TCP"


def test_kernel_architectures_default_to_the_ipvs_engine() -> None:
    resource = _lb(mode="L4", architecture="nat", listeners=[{"name": "dns", "port": 53, "protocol": "UDP"}])
    assert resolve.resolve(resource, resolve.StaticView()).engine == api.Engine.ipvs


def test_an_l4_plan_sends_everything_to_its_only_backend() -> None:
    resource = _lb(
        mode="L4", architecture="proxy", listeners=[{"name": "t", "port": 9000, "protocol": "TCP"}]
    )
    resource.spec.defaultBackend = None
    assert resolve.resolve(resource, resolve.StaticView()).default_backend == "app"


def test_addresses_are_normalised_and_endpoints_sorted() -> None:
    backends = [
        {
            "name": "app",
            "endpoints": [
                {"address": "10.0.0.10", "port": 80},
                {"address": "10.0.0.9", "port": 80},
                {"address": "2001:DB8::1", "port": 80},
            ],
        }
    ]
    result = resolve.resolve(_lb(backends=backends, vip="2001:DB8::A"), resolve.StaticView())
    assert [e.address for e in result.backend("app").endpoints] == ["10.0.0.9", "10.0.0.10", "2001:db8::1"]
    assert result.vip == "2001:db8::a"


def test_a_service_reference_in_a_standalone_file_is_a_clear_error() -> None:
    resource = _lb(backends=[{"name": "app", "service": {"name": "shop", "port": 80}}])
    with pytest.raises(resolve.Unresolvable) as caught:
        resolve.resolve(resource, resolve.StaticView())
    assert caught.value.reason == "BackendNotFound"
    [problem] = caught.value.problems
    assert problem.path == "spec.backends[0].service"
    assert "Service shop cannot be resolved in a standalone file" in problem.message


def test_a_standalone_file_needs_a_vip() -> None:
    resource = _lb()
    resource.spec.vip = None
    with pytest.raises(resolve.Unresolvable) as caught:
        resolve.resolve(resource, resolve.StaticView())
    assert [str(p) for p in caught.value.problems] == [
        "spec.vip: required in a standalone file (no VIPPool allocates one)"
    ]


def test_every_unresolvable_reference_is_reported_at_once() -> None:
    resource = _lb(
        listeners=[{"name": "https", "port": 8443, "protocol": "HTTPS", "tls": {"secretName": "missing"}}],
        backends=[{"name": "app", "service": {"name": "shop", "port": 80}}],
    )
    with pytest.raises(resolve.Unresolvable) as caught:
        resolve.resolve(resource, resolve.StaticView())
    assert [p.path for p in caught.value.problems] == [
        "spec.listeners[0].tls.secretName",
        "spec.backends[0].service",
    ]


def test_routes_are_ordered_most_specific_first() -> None:
    backends = [
        {"name": name, "endpoints": [{"address": "127.0.0.1", "port": 9000 + i}]}
        for i, name in enumerate(["a", "b", "c", "d", "e", "f"])
    ]
    routes = [
        {"match": {"pathPrefix": "/"}, "backend": "a"},
        {"match": {"pathPrefix": "/v1"}, "backend": "b"},
        {"match": {"path": "/v1/exact"}, "backend": "c"},
        {"match": {"hosts": ["*.example.com"]}, "backend": "d"},
        {"match": {"hosts": ["api.example.com"]}, "backend": "e"},
        {"match": {"pathPrefix": "/v1", "methods": ["GET"], "headers": {"X-Canary": "true"}}, "backend": "f"},
    ]
    result = resolve.resolve(_lb(backends=backends, routes=routes, defaultBackend="a"), resolve.StaticView())
    assert [r.backend for r in result.routes] == ["e", "d", "c", "f", "b", "a"]
    assert result.routes[3].headers == (("x-canary", "true"),)


def _self_signed(tmp_path: Path, name: str) -> tuple[str, str]:
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
         "-out", str(cert), "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},DNS:www.{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert.read_text(), key.read_text()


def test_tls_secrets_in_the_same_files_become_certificates_with_their_names(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path, "shop.example.com")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "shop-tls", "namespace": "demo"},
        "stringData": {"tls.crt": cert, "tls.key": key},
    }
    view = resolve.StaticView(secrets={("demo", "shop-tls"): secret})
    resource = _lb(
        listeners=[{"name": "https", "port": 8443, "protocol": "HTTPS", "tls": {"secretName": "shop-tls"}}]
    )
    [certificate] = resolve.resolve(resource, view).listeners[0].certificates
    assert certificate.names == ("shop.example.com", "www.shop.example.com")
    assert certificate.source == "Secret/shop-tls"


def test_a_secret_without_pem_material_is_refused_with_its_name() -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "bad"},
        "data": {"tls.crt": "bm9wZQ=="},
    }
    with pytest.raises(resolve.Unresolvable) as caught:
        resolve.certificate_from_secret(secret, "spec.listeners[0].tls.secretName")
    assert caught.value.reason == "InvalidCertificate"
    assert "Secret bad needs PEM tls.crt and tls.key" in str(caught.value)

"""`validation.validate`: one resource in, a typed model or every problem out, each naming its field path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from layerlb import api, validation


def _spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": "L7",
        "architecture": "proxy",
        "vip": "127.0.0.10",
        "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
        "backends": [{"name": "app", "endpoints": [{"address": "127.0.0.1", "port": 9001}]}],
        "defaultBackend": "app",
    }
    spec.update(changes)
    return spec


def _l4(**changes: Any) -> dict[str, Any]:
    spec = _spec(
        mode="L4",
        architecture="nat",
        vip="10.96.100.10",
        listeners=[{"name": "tcp", "port": 443, "protocol": "TCP"}],
        backends=[{"name": "app", "endpoints": [{"address": "10.244.1.10", "port": 8443}]}],
    )
    del spec["defaultBackend"]
    spec.update(changes)
    return spec


def _lb(spec: Any, **document: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": spec,
    }
    resource.update(document)
    return resource


def _pool(*addresses: str) -> dict[str, Any]:
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "pool"},
        "spec": {"addresses": list(addresses)},
    }


def _problems(document: Any) -> list[str]:
    """Every problem as `path: message`; fails the test when the document is accepted."""
    with pytest.raises(validation.Invalid) as caught:
        validation.validate(document)
    return [str(problem) for problem in caught.value.problems]


def _load_balancer(document: dict[str, Any]) -> api.LoadBalancer:
    resource = validation.validate(document)
    assert isinstance(resource, api.LoadBalancer)
    return resource


# --- accepted resources and defaults -------------------------------------------------------------------


def test_a_valid_load_balancer_comes_back_as_a_typed_model() -> None:
    resource = _load_balancer(_lb(_spec()))
    assert resource.metadata.name == "web"
    assert resource.spec.mode is api.Mode.L7
    assert resource.spec.listeners[0].protocol is api.Protocol.HTTP


def test_defaults_are_applied_to_what_the_user_left_out() -> None:
    spec = _spec(
        backends=[{"name": "app", "endpoints": [{"address": "127.0.0.1"}], "healthCheck": {}}],
        sessionAffinity={},
        timeouts={},
        limits={},
    )
    resource = _load_balancer(_lb(spec))
    assert resource.spec.replicas == 1
    assert resource.spec.engine is None
    backend = resource.spec.backends[0]
    assert backend.algorithm is api.Algorithm.round_robin
    assert backend.endpoints is not None
    assert (backend.endpoints[0].port, backend.endpoints[0].weight) == (None, 1)
    assert backend.healthCheck == api.HealthCheck(
        protocol=api.HealthProtocol.TCP,
        path="/",
        intervalSeconds=5,
        timeoutSeconds=1,
        healthyThreshold=2,
        unhealthyThreshold=3,
    )
    affinity = resource.spec.sessionAffinity
    assert affinity is not None
    assert (affinity.type, affinity.timeoutSeconds, affinity.cookieName) == (
        api.AffinityType.None_,
        10800,
        "layerlb",
    )
    assert resource.spec.timeouts == api.Timeouts(
        connectSeconds=5, headerSeconds=10, requestSeconds=60, idleSeconds=60
    )
    assert resource.spec.limits == api.Limits(maxRequestLineBytes=8192, maxHeaderBytes=65536)


def test_a_vippool_with_cidrs_ranges_and_ipv6_is_accepted() -> None:
    resource = validation.validate(_pool("192.0.2.0/28", "192.0.2.100-192.0.2.120", "2001:db8::/120"))
    assert isinstance(resource, api.VIPPool)
    assert resource.spec.autoAssign is True


def test_an_ipv6_vip_and_endpoints_are_accepted() -> None:
    spec = _spec(vip="2001:db8::10", backends=[{"name": "app", "endpoints": [{"address": "2001:db8::1"}]}])
    assert _load_balancer(_lb(spec)).spec.vip == "2001:db8::10"


def test_the_same_port_on_tcp_and_udp_is_allowed() -> None:
    listeners = [
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        {"name": "dns-udp", "port": 53, "protocol": "UDP"},
    ]
    assert len(_load_balancer(_lb(_l4(listeners=listeners))).spec.listeners) == 2


def test_an_l4_load_balancer_with_one_backend_needs_no_default_backend() -> None:
    assert _load_balancer(_lb(_l4())).spec.defaultBackend is None


def test_unicode_header_values_are_accepted() -> None:
    routes = [{"match": {"headers": {"Accept-Language": "日本語"}}, "backend": "app"}]
    resource = _load_balancer(_lb(_spec(routes=routes)))
    assert resource.spec.routes is not None
    assert resource.spec.routes[0].match.headers == {"Accept-Language": "日本語"}


def test_validate_does_not_modify_its_input() -> None:
    document = _lb(_spec(backends=[{"name": "app", "endpoints": [{"address": "127.0.0.1"}]}]))
    before = copy.deepcopy(document)
    validation.validate(document)
    assert document == before


# --- rule messages -------------------------------------------------------------------------------------


def test_l7_listener_with_udp_names_the_listener_and_valid_protocols() -> None:
    listeners = [
        {"name": "http", "port": 8080, "protocol": "HTTP"},
        {"name": "dns", "port": 5353, "protocol": "UDP"},
    ]
    (problem,) = _problems(_lb(_spec(listeners=listeners)))
    assert problem.startswith(
        "spec.listeners: listener protocol not available in mode L7 (valid: HTTP, HTTPS): "
    )
    assert "dns" in problem and "http" not in problem.split(": ")[-1]


def test_an_engine_that_cannot_do_the_architecture_says_what_would_work() -> None:
    backends = [{"name": "app", "endpoints": [{"address": "198.51.100.31"}]}]
    assert _problems(_lb(_l4(architecture="tunnel", engine="nftables", backends=backends))) == [
        "spec.engine: engine nftables cannot do architecture tunnel (IP-in-IP); use engine ipvs, or architecture nat or dsr"
    ]


def test_an_engine_on_a_proxy_architecture_is_refused_not_ignored() -> None:
    assert _problems(_lb(_spec(engine="ipvs"))) == [
        "spec.engine: engine applies only to L4 nat, dsr and tunnel, not to L7 proxy; remove it"
    ]


def test_an_architecture_of_the_other_mode_lists_the_valid_ones() -> None:
    assert _problems(_lb(_l4(architecture="transparent"))) == [
        "spec.architecture: architecture transparent is not available in mode L4; valid: nat, dsr, tunnel, proxy"
    ]
    backends = [{"name": "app", "endpoints": [{"address": "127.0.0.1"}]}]
    assert _problems(_lb(_spec(architecture="dsr", backends=backends))) == [
        "spec.architecture: architecture dsr is not available in mode L7; valid: proxy, transparent"
    ]


def test_rule_problems_in_list_items_name_the_item_by_index() -> None:
    backends = [
        {"name": "app", "endpoints": [{"address": "127.0.0.1"}]},
        {
            "name": "api",
            "endpoints": [{"address": "127.0.0.1"}, {"address": "::1"}, {"address": "api.local"}],
        },
    ]
    assert _problems(_lb(_spec(backends=backends))) == [
        "spec.backends[1].endpoints[2].address: 'api.local' is not an IPv4 or IPv6 address"
    ]


def test_a_health_check_timeout_equal_to_its_interval_is_refused_with_both_values() -> None:
    backends = [
        {
            "name": "app",
            "endpoints": [{"address": "127.0.0.1"}],
            "healthCheck": {"intervalSeconds": 3, "timeoutSeconds": 3},
        }
    ]
    assert _problems(_lb(_spec(backends=backends))) == [
        "spec.backends[0].healthCheck.timeoutSeconds: timeoutSeconds (3) must be below intervalSeconds (3)"
    ]


def test_the_default_health_check_timeout_is_compared_with_a_short_interval() -> None:
    backends = [
        {"name": "app", "endpoints": [{"address": "127.0.0.1"}], "healthCheck": {"intervalSeconds": 1}}
    ]
    assert _problems(_lb(_spec(backends=backends))) == [
        "spec.backends[0].healthCheck.timeoutSeconds: timeoutSeconds (1) must be below intervalSeconds (1)"
    ]


def test_https_without_tls_and_http_with_tls_are_both_refused_per_listener() -> None:
    listeners = [
        {"name": "plain", "port": 8080, "protocol": "HTTP", "tls": {"secretName": "web-tls"}},
        {"name": "secure", "port": 8443, "protocol": "HTTPS"},
    ]
    assert _problems(_lb(_spec(listeners=listeners))) == [
        "spec.listeners[0].tls: tls applies only to protocol HTTPS, not HTTP",
        "spec.listeners[1].tls: protocol HTTPS requires tls.secretName",
    ]


def test_http_and_https_on_one_port_collide_because_both_are_tcp() -> None:
    listeners = [
        {"name": "a", "port": 8443, "protocol": "HTTP"},
        {"name": "b", "port": 8443, "protocol": "HTTPS", "tls": {"secretName": "web-tls"}},
    ]
    assert _problems(_lb(_spec(listeners=listeners))) == [
        "spec.listeners: listener ports must be unique per transport (TCP or UDP); repeated: 8443"
    ]


def test_an_empty_routes_list_without_default_backend_would_serve_nothing() -> None:
    spec = _spec(routes=[])
    del spec["defaultBackend"]
    assert _problems(_lb(spec)) == [
        "spec.defaultBackend: mode L7 needs routes or a defaultBackend; without either every request would get 404"
    ]


def test_a_vippool_range_that_ends_before_it_starts_is_refused() -> None:
    assert _problems(_pool("192.0.2.0/28", "192.0.2.20-192.0.2.10")) == [
        "spec.addresses[1]: '192.0.2.20-192.0.2.10' ends before it starts"
    ]


def test_a_vippool_range_mixing_families_is_not_a_range() -> None:
    assert _problems(_pool("192.0.2.1-2001:db8::1")) == [
        "spec.addresses[0]: '192.0.2.1-2001:db8::1' is not a CIDR (192.0.2.0/28) or a range (192.0.2.10-192.0.2.20)"
    ]


# --- every problem, not only the first ------------------------------------------------------------------


def test_every_schema_problem_is_reported_not_just_the_first() -> None:
    spec = _spec(
        replicas=0,
        listeners=[{"name": "HTTP", "port": 0, "protocol": "SCTP"}],
        backends=[
            {"name": "app", "endpoints": [{"address": "127.0.0.1", "weight": 300}], "algorithm": "fastest"}
        ],
    )
    problems = _problems(_lb(spec))
    assert [problem.split(":")[0] for problem in problems] == [
        "spec.replicas",
        "spec.listeners[0].name",
        "spec.listeners[0].port",
        "spec.listeners[0].protocol",
        "spec.backends[0].endpoints[0].weight",
        "spec.backends[0].algorithm",
    ]


def test_every_rule_problem_is_reported_not_just_the_first() -> None:
    spec = _l4(
        engine="nftables",
        listeners=[{"name": "web", "port": 80, "protocol": "HTTP"}],
        sessionAffinity={"type": "Cookie"},
        routes=[{"match": {"pathPrefix": "/"}, "backend": "missing"}],
        limits={},
    )
    assert [problem.split(":")[0] for problem in _problems(_lb(spec))] == [
        "spec.listeners",
        "spec.routes",
        "spec.routes",
        "spec.sessionAffinity",
        "spec.limits",
    ]


def test_the_invalid_exception_text_joins_every_problem() -> None:
    with pytest.raises(validation.Invalid) as caught:
        validation.validate(_lb(_spec(replicas=0, vip=None, listeners=[])))
    assert str(caught.value) == "; ".join(str(problem) for problem in caught.value.problems)
    assert len(caught.value.problems) == 2


# --- schema messages and paths -------------------------------------------------------------------------


def test_an_unknown_field_lists_the_valid_fields_of_its_object() -> None:
    listeners = [{"name": "http", "port": 8080, "protocol": "HTTP", "targetPort": 9001}]
    assert _problems(_lb(_spec(listeners=listeners))) == [
        "spec.listeners[0].targetPort: unknown field; valid fields: name, port, protocol, tls, maxConnections, "
        "maxConnectionsPerClient, acceptProxyProtocol"
    ]


def test_a_misspelled_spec_field_is_unknown_not_silently_dropped() -> None:
    assert _problems(_lb(_spec(defaultbackend="app"))) == [
        "spec.defaultbackend: unknown field; valid fields: " + ", ".join(api.LoadBalancerSpec.model_fields)
    ]


def test_a_bad_enum_value_lists_the_valid_values() -> None:
    assert _problems(_lb(_spec(mode="L3"))) == ["spec.mode: unsupported value 'L3'; valid: L4, L7"]


def test_a_missing_required_field_says_required() -> None:
    spec = _spec()
    del spec["backends"]
    assert _problems(_lb(spec)) == ["spec.backends: required"]
    assert _problems(_lb(_spec(), metadata={"namespace": "demo"})) == ["metadata.name: required"]


def test_an_empty_list_says_how_many_items_it_needs() -> None:
    assert _problems(_lb(_spec(listeners=[]))) == ["spec.listeners: needs at least 1 item(s)"]


def test_a_non_numeric_port_says_an_integer_is_expected() -> None:
    listeners = [{"name": "http", "port": "http", "protocol": "HTTP"}]
    assert _problems(_lb(_spec(listeners=listeners))) == [
        "spec.listeners[0].port: expected an integer, got 'http'"
    ]


def test_a_bad_name_says_what_a_dns_label_is() -> None:
    listeners = [{"name": "Public_HTTP", "port": 8080, "protocol": "HTTP"}]
    assert _problems(_lb(_spec(listeners=listeners))) == [
        "spec.listeners[0].name: 'Public_HTTP' is not a DNS label (lower-case letters, digits and '-', at most 63, "
        "alphanumeric at both ends)"
    ]


def test_a_weight_above_256_is_out_of_range() -> None:
    backends = [{"name": "app", "endpoints": [{"address": "127.0.0.1", "weight": 257}]}]
    assert _problems(_lb(_spec(backends=backends))) == [
        "spec.backends[0].endpoints[0].weight: 257 is out of range; must be <= 256"
    ]


def test_max_connections_per_client_is_bounded_and_proxy_only() -> None:
    listeners = [{"name": "http", "port": 8080, "protocol": "HTTP", "maxConnectionsPerClient": 0}]
    assert _problems(_lb(_spec(listeners=listeners))) == [
        "spec.listeners[0].maxConnectionsPerClient: 0 is out of range; must be >= 1"
    ]
    kernel = _spec(
        mode="L4",
        architecture="nat",
        defaultBackend=None,
        listeners=[{"name": "tcp", "port": 8080, "protocol": "TCP", "maxConnectionsPerClient": 10}],
    )
    del kernel["defaultBackend"]
    assert _problems(_lb(kernel)) == [
        "spec.listeners: acceptProxyProtocol, maxConnections and maxConnectionsPerClient need architecture "
        'proxy or transparent: ["tcp"]'
    ]


def test_a_header_name_in_a_map_key_is_rendered_in_brackets() -> None:
    routes = [{"match": {"headers": {"X Canary": "1"}}, "backend": "app"}]
    assert _problems(_lb(_spec(routes=routes))) == [
        "spec.routes[0].match.headers[X Canary]: 'X Canary' is not an HTTP header or cookie name "
        "(letters, digits and !#$%&'*+.^_`|~-)"
    ]


def test_a_header_value_of_the_wrong_type_names_its_key() -> None:
    routes = [{"match": {"headers": {"x-canary": True}}, "backend": "app"}]
    (problem,) = _problems(_lb(_spec(routes=routes)))
    assert problem.startswith("spec.routes[0].match.headers")
    assert "x-canary" in problem and problem.endswith(": expected a string, got True")


def test_a_unicode_host_is_refused_as_not_a_host_name() -> None:
    routes = [{"match": {"hosts": ["bücher.example"]}, "backend": "app"}]
    assert _problems(_lb(_spec(routes=routes))) == [
        "spec.routes[0].match.hosts[0]: 'bücher.example' is not a host name (lower case, optionally *. first and "
        ":port last)"
    ]


def test_a_unicode_resource_name_is_refused_as_not_a_dns_name() -> None:
    assert _problems(_lb(_spec(), metadata={"name": "wéb"})) == [
        "metadata.name: 'wéb' is not a DNS name (lower-case DNS labels joined by '.')"
    ]


@pytest.mark.parametrize(
    ("location", "path"),
    [
        (("spec", "backends", 0, "name"), "spec.backends[0].name"),
        (("spec", "backends", 1, "endpoints", 12, "port"), "spec.backends[1].endpoints[12].port"),
        (("spec", "routes", 0, "match", "headers", "X-Id", "[key]"), "spec.routes[0].match.headers[X-Id]"),
        (("metadata",), "metadata"),
        ((), ""),
    ],
)
def test_locations_render_as_kubernetes_field_paths(location: tuple[int | str, ...], path: str) -> None:
    assert validation.path_of(location) == path


def test_a_problem_without_a_path_prints_only_its_message() -> None:
    assert str(validation.Problem("", "no resources")) == "no resources"
    assert str(validation.Problem("spec.vip", "required")) == "spec.vip: required"


# --- odd input never raises anything but Invalid ----------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "expected a Kubernetes resource (a mapping), got list"),
        (["kind", "LoadBalancer"], "expected a Kubernetes resource (a mapping), got list"),
        ("LoadBalancer", "expected a Kubernetes resource (a mapping), got str"),
        (None, "expected a Kubernetes resource (a mapping), got NoneType"),
        (42, "expected a Kubernetes resource (a mapping), got int"),
    ],
)
def test_a_document_that_is_not_a_mapping_is_refused_saying_what_it_is(document: Any, message: str) -> None:
    assert _problems(document) == [message]


def test_a_missing_or_unknown_kind_lists_the_valid_kinds() -> None:
    assert _problems({"apiVersion": "layerlb.dev/v1alpha1"}) == [
        "kind: unsupported kind None; valid: LoadBalancer, VIPPool, BGPPeer, BGPAdvertisement"
    ]
    assert _problems(_lb(_spec(), kind="Service")) == [
        "kind: unsupported kind 'Service'; valid: LoadBalancer, VIPPool, BGPPeer, BGPAdvertisement"
    ]


def test_a_wrong_api_version_names_the_supported_one() -> None:
    assert _problems(_lb(_spec(), apiVersion="layerlb.dev/v1")) == [
        "apiVersion: unsupported apiVersion 'layerlb.dev/v1'; valid: layerlb.dev/v1alpha1"
    ]


@pytest.mark.parametrize("kind", [["LoadBalancer"], {"name": "LoadBalancer"}, 7, True])
def test_a_kind_that_is_not_a_string_is_refused_not_crashed(kind: Any) -> None:
    (problem,) = _problems(_lb(_spec(), kind=kind))
    assert problem.startswith("kind: unsupported kind ")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("L7", ["spec: expected a mapping, got 'L7'"]),
        (None, ["spec: expected a mapping, got None"]),
        ([1, 2], ["spec: expected a mapping, got [1, 2]"]),
        (_spec(listeners={}), ["spec.listeners: expected a list, got {}"]),
        (_spec(listeners=[[[]]]), ["spec.listeners[0]: expected a mapping, got [[]]"]),
        (_spec(listeners="http"), ["spec.listeners: expected a list, got 'http'"]),
        (_spec(backends=[{"name": "app", "endpoints": {"address": "127.0.0.1"}}]), None),
        (_spec(timeouts=[]), ["spec.timeouts: expected a mapping, got []"]),
        (_spec(replicas="many"), ["spec.replicas: expected an integer, got 'many'"]),
    ],
)
def test_nested_wrong_types_are_problems_not_tracebacks(spec: Any, expected: list[str] | None) -> None:
    problems = _problems(_lb(spec))
    if expected is not None:
        assert problems == expected
    else:
        assert problems and all(problem.startswith("spec.backends[0].endpoints") for problem in problems)


def test_metadata_of_the_wrong_type_is_a_problem() -> None:
    assert _problems(_lb(_spec(), metadata=[])) == ["metadata: expected a mapping, got []"]
    assert _problems(_lb(_spec(), metadata={"name": {"first": "web"}})) == [
        "metadata.name: expected a string, got {'first': 'web'}"
    ]


def test_a_huge_integer_is_out_of_range_and_its_message_stays_short() -> None:
    listeners = [{"name": "http", "port": 10**100, "protocol": "HTTP"}]
    (problem,) = _problems(_lb(_spec(listeners=listeners)))
    assert problem.startswith("spec.listeners[0].port: 1000000")
    assert problem.endswith("... is out of range; must be <= 65535")
    assert len(problem) < 140


def test_a_negative_huge_integer_is_out_of_range() -> None:
    assert _problems(_lb(_spec(replicas=-(2**64)))) == [
        f"spec.replicas: {-(2**64)} is out of range; must be >= 1"
    ]


def test_a_very_long_string_is_cut_short_in_the_message() -> None:
    (problem,) = _problems(_lb(_spec(mode="L" * 10_000)))
    assert problem.startswith("spec.mode: unsupported value 'LLL")
    assert len(problem) < 200


def test_an_unknown_field_at_the_top_is_reported() -> None:
    assert _problems(_lb(_spec(), extra={"a": 1})) == [
        "extra: unknown field; valid fields: apiVersion, kind, metadata, spec, status"
    ]


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"kind": None},
        {"kind": "VIPPool", "apiVersion": "layerlb.dev/v1alpha1"},
        {"kind": "VIPPool", "apiVersion": "layerlb.dev/v1alpha1", "metadata": {"name": "p"}, "spec": {}},
        {
            "kind": "VIPPool",
            "apiVersion": "layerlb.dev/v1alpha1",
            "metadata": {"name": "p"},
            "spec": {"addresses": [1]},
        },
        _lb({"mode": "L4"}),
        _lb(_spec(backends=[{}])),
        _lb(_spec(routes=[{"match": None, "backend": None}])),
        _lb(_spec(sessionAffinity={"type": "Cookie", "cookieName": "a b"})),
        _lb(_spec(timeouts={"connectSeconds": float("nan")})),
        _lb(_spec(timeouts={"idleSeconds": float("inf")})),
        _lb(_spec(listeners=[{"name": "http", "port": 8080, "protocol": "HTTP", 5: "x"}])),
    ],
)
def test_odd_documents_raise_only_invalid(document: Any) -> None:
    assert _problems(document)


@pytest.mark.parametrize(
    ("document", "name"),
    [
        (_lb(_spec()), "LoadBalancer/web"),
        ({"kind": "VIPPool"}, "VIPPool/?"),
        ({"metadata": {"name": "web"}}, "?/web"),
        ({"kind": "LoadBalancer", "metadata": "web"}, "LoadBalancer/?"),
        (["LoadBalancer"], "?/?"),
        (None, "?/?"),
    ],
)
def test_the_name_of_a_document_is_told_as_far_as_it_can_be(document: Any, name: str) -> None:
    assert validation.name_of(document) == name


# --- agreement with the API server's schema and CEL libraries -------------------------------------------


def test_numbers_are_not_taken_from_strings_or_booleans_as_the_api_server_refuses_them() -> None:
    for port in ("8080", True, 80.0):
        spec = _spec(listeners=[{"name": "http", "port": port, "protocol": "HTTP"}])
        [problem] = _problems(_lb(spec))
        assert problem.startswith("spec.listeners[0].port: expected an integer"), problem


def test_non_finite_timeouts_are_refused() -> None:
    [problem] = _problems(_lb(_spec(timeouts={"idleSeconds": float("nan")})))
    assert problem == "spec.timeouts.idleSeconds: expected a finite number, got nan"


def test_addresses_cel_isip_refuses_are_refused_here_too() -> None:
    for address in ("::ffff:10.0.0.1", "fe80::1%eth0"):
        spec = _spec(backends=[{"name": "app", "endpoints": [{"address": address, "port": 80}]}])
        assert _problems(_lb(spec)) == [
            f"spec.backends[0].endpoints[0].address: '{address}' is not an IPv4 or IPv6 address"
        ]


def test_a_cidr_needs_a_prefix_length_as_cel_iscidr_does() -> None:
    for value in ("10.0.0.1", "10.0.0.0/255.0.0.0"):
        listener = {
            "name": "http",
            "port": 80,
            "protocol": "HTTP",
            "acceptProxyProtocol": {"trustedCIDRs": [value]},
        }
        assert _problems(_lb(_spec(listeners=[listener]))) == [
            f"spec.listeners[0].acceptProxyProtocol.trustedCIDRs[0]: '{value}' is not a CIDR such as 10.0.0.0/8"
        ]
    assert _problems(_pool("192.0.2.10 - 192.0.2.20")) == [
        "spec.addresses[0]: '192.0.2.10 - 192.0.2.20' is not a CIDR (192.0.2.0/28) or a range (192.0.2.10-192.0.2.20)"
    ]

"""A Service asking for a layerlb architecture becomes a LoadBalancer it owns, on its own address; what
that LoadBalancer cannot serve is refused on the Service with the field, the value and what would work;
the derived LoadBalancer's status reads on the Service; a user's LoadBalancer of the name is never
touched (the real API server's view is in e2e/test_service_architectures.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from layerlb_operator import service_frontend, service_loadbalancer, vips
from layerlb_operator.service_loadbalancer import ARCHITECTURE_ANNOTATION, ENGINE_ANNOTATION

from layerlb import validation
from layerlb.resolve import Unresolvable

POOL = vips.pool_from(
    {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": "public"},
        "spec": {"addresses": ["192.0.2.0/30", "2001:db8::/126"]},
    }
)
UID = "0b9e3c2a-1111-2222-3333-444455556666"


def _service(
    architecture: str | None = "proxy",
    *,
    ports: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    name: str = "web",
    **spec: Any,
) -> dict[str, Any]:
    notes = dict(annotations or {})
    if architecture is not None:
        notes[ARCHITECTURE_ANNOTATION] = architecture
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "uid": UID, "annotations": notes},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": service_frontend.CLASS,
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
            if ports is None
            else ports,
            **spec,
        },
    }


def _refusal(service: dict[str, Any], addresses: tuple[str, ...] = ("192.0.2.10",)) -> tuple[str, str]:
    with pytest.raises(Unresolvable) as refused:
        service_loadbalancer.translate(
            service, service["metadata"]["annotations"][ARCHITECTURE_ANNOTATION], addresses
        )
    return refused.value.reason, str(refused.value)


def _stored(document: dict[str, Any], **status: Any) -> dict[str, Any]:
    """The derived LoadBalancer as the API server stores it: defaults filled in, server metadata, a status."""
    stored: dict[str, Any] = {
        **document,
        "metadata": {**document["metadata"], "uid": "lb-uid", "generation": 1, "resourceVersion": "7"},
    }
    stored["spec"] = {**document["spec"], "replicas": 1}
    stored["spec"]["backends"] = [{**b, "algorithm": "round-robin"} for b in document["spec"]["backends"]]
    if status:
        stored["status"] = status
    return stored


def test_a_proxy_service_becomes_an_l4_load_balancer_it_owns_on_its_own_address() -> None:
    document = service_loadbalancer.translate(_service(), "proxy", ("192.0.2.10",))
    assert document == {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {
            "name": "svc-web",
            "namespace": "shop",
            "labels": {"layerlb.dev/service": "web", "app.kubernetes.io/managed-by": "layerlb-operator"},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": "web",
                    "uid": UID,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "mode": "L4",
            "architecture": "proxy",
            "vip": "192.0.2.10",
            "replicas": 1,
            "listeners": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "backends": [{"name": "web", "service": {"name": "web", "port": 80}, "algorithm": "round-robin"}],
        },
    }
    validation.validate(document)  # what the API server's schema and CEL rules accept too


def test_a_kernel_service_names_its_engine_by_annotation_and_keeps_session_affinity() -> None:
    service = _service(
        "nat",
        ports=[{"port": 53, "protocol": "UDP"}],
        annotations={ENGINE_ANNOTATION: "ipvs"},
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
    )
    spec = service_loadbalancer.translate(service, "nat", ("192.0.2.10",))["spec"]
    assert spec["engine"] == "ipvs"
    assert spec["listeners"] == [{"name": "udp-53", "port": 53, "protocol": "UDP"}]
    assert spec["sessionAffinity"] == {"type": "ClientIP", "timeoutSeconds": 600}
    # Without the engine annotation the operator's default applies (no engine field).
    assert (
        "engine"
        not in service_loadbalancer.translate(_service("dsr", ports=[{"port": 80}]), "dsr", ("192.0.2.1",))[
            "spec"
        ]
    )


def test_nat_and_proxy_map_ports_including_named_ones() -> None:
    for architecture in ("nat", "proxy"):
        named = _service(architecture, ports=[{"name": "http", "port": 80, "targetPort": "web"}])
        backend = service_loadbalancer.translate(named, architecture, ("192.0.2.1",))["spec"]["backends"][0]
        assert backend["service"] == {"name": "web", "port": 80}  # the EndpointSlices give the target port


def test_the_derived_name_is_a_dns_label_that_stays_distinct_when_shortened() -> None:
    assert service_loadbalancer.name_of("web") == "svc-web"
    long_a, long_b = "a" * 62 + "x", "a" * 62 + "y"
    names = {service_loadbalancer.name_of(long_a), service_loadbalancer.name_of(long_b)}
    assert len(names) == 2
    for name in names:
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name


@pytest.mark.parametrize(
    ("service", "addresses", "reason", "message"),
    [
        (
            _service(ports=[{"name": "http", "port": 80}, {"name": "https", "port": 443}]),
            ("192.0.2.10",),
            "UnsupportedService",
            "spec.ports: the Service has 2 ports (http 80/TCP, https 443/TCP), but a LoadBalancer derived for "
            "architecture proxy must have exactly one: an L4 LoadBalancer sends every listener to its one "
            "backend (one Service port); make one Service per port, or remove the annotation "
            "layerlb.dev/architecture (kube-proxy forwards every port)",
        ),
        (
            _service(ports=[{"name": "sig", "port": 3868, "protocol": "SCTP"}]),
            ("192.0.2.10",),
            "UnsupportedService",
            "spec.ports[0].protocol: SCTP is not forwarded by layerlb (TCP and UDP are); remove the annotation "
            "layerlb.dev/architecture to have kube-proxy forward it",
        ),
        (
            _service("dsr"),
            ("192.0.2.10",),
            "UnsupportedService",
            "spec.ports[0].targetPort: 8080 differs from port 80, but architecture dsr cannot change the "
            "destination port (the endpoints are reached on the VIP's port, 80); set targetPort to 80, or use "
            "architecture nat or proxy, which map ports",
        ),
        (
            _service("tunnel", ports=[{"port": 80, "targetPort": "http"}]),
            ("192.0.2.10",),
            "UnsupportedService",
            "spec.ports[0].targetPort: 'http' is a named port, but architecture tunnel cannot change the "
            "destination port (the endpoints are reached on the VIP's port, 80); set targetPort to 80, or use "
            "architecture nat or proxy, which map ports",
        ),
        (
            _service(ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"]),
            ("192.0.2.10", "2001:db8::10"),
            "UnsupportedService",
            "spec.ipFamilyPolicy: the Service has 2 addresses (192.0.2.10, 2001:db8::10; spec.ipFamilyPolicy "
            "RequireDualStack), but a LoadBalancer holds one VIP; make the Service SingleStack, or remove the "
            "annotation layerlb.dev/architecture",
        ),
        (
            _service("nat", annotations={ENGINE_ANNOTATION: "iptables"}),
            ("192.0.2.10",),
            "InvalidEngine",
            "metadata.annotations[layerlb.dev/engine]: 'iptables' is not an engine; valid: ipvs, nftables "
            "(or no annotation: ipvs)",
        ),
        (
            _service("proxy", annotations={ENGINE_ANNOTATION: "ipvs"}),
            ("192.0.2.10",),
            "InvalidEngine",
            "metadata.annotations[layerlb.dev/engine]: 'ipvs' applies only to the kernel architectures nat, "
            "dsr and tunnel, not to proxy (layerlb's userspace relay); remove the annotation",
        ),
        (
            _service("tunnel", ports=[{"port": 80}], annotations={ENGINE_ANNOTATION: "nftables"}),
            ("192.0.2.10",),
            "InvalidEngine",
            "metadata.annotations[layerlb.dev/engine]: engine nftables cannot do architecture tunnel "
            "(IP-in-IP); use engine ipvs, or architecture nat or dsr",
        ),
        (
            _service("nat", annotations={ENGINE_ANNOTATION: "nftables"}, sessionAffinity="ClientIP"),
            ("192.0.2.10",),
            "UnsupportedService",
            "spec.sessionAffinity: ClientIP cannot be kept by engine nftables (it balances by hashing, without "
            "timeouts); use engine ipvs (layerlb.dev/engine: ipvs), or sessionAffinity None",
        ),
    ],
    ids=["multi-port", "sctp", "dsr-target-port", "tunnel-named-port", "dual-stack", "unknown-engine",
         "engine-with-proxy", "nftables-tunnel", "nftables-affinity"],
)  # fmt: skip
def test_what_a_derived_load_balancer_cannot_serve_is_refused_saying_why(
    service: dict[str, Any], addresses: tuple[str, ...], reason: str, message: str
) -> None:
    assert _refusal(service, addresses) == (reason, message)


def _decide(service: dict[str, Any], derived: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    return service_frontend.decide(service, pools=[POOL], holders=kwargs.get("holders", {}), derived=derived)


def test_the_service_reads_loadbalancer_created_and_its_ip_mode() -> None:
    decision = _decide(_service())
    assert decision.ingress == [{"ip": "192.0.2.0", "ipMode": "Proxy"}]
    assert decision.loadbalancer is not None and not decision.remove_loadbalancer
    accepted = decision.conditions[1]
    assert (accepted["type"], accepted["status"], accepted["reason"]) == (
        "layerlb.dev/ArchitectureAccepted",
        "True",
        "LoadBalancerCreated",
    )
    assert accepted["message"] == (
        "LoadBalancer shop/svc-web (L4 proxy, VIP 192.0.2.0) forwards the Service through layerlb's "
        "forwarding pods (ipMode Proxy)"
    )
    nat = _decide(_service("nat", ports=[{"port": 80}]))
    assert nat.ingress == [{"ip": "192.0.2.0", "ipMode": "Proxy"}]  # kube-proxy kept off it: layerlb's nat


def test_a_refused_derived_load_balancer_reads_on_the_service_and_kube_proxy_forwards() -> None:
    desired = _decide(_service()).loadbalancer
    assert desired is not None
    refused = {
        "type": "Accepted",
        "status": "False",
        "reason": "InvalidSpec",
        "message": "spec.listeners[0]: nope",
    }
    ready = {
        "type": "Ready",
        "status": "False",
        "reason": "Pending",
        "message": "0/1 forwarding pods serve generation 1",
    }
    decision = _decide(_service(), _stored(desired, conditions=[refused, ready]))
    _, accepted, reflected = decision.conditions
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidSpec")
    assert accepted["message"] == (
        "LoadBalancer shop/svc-web (L4 proxy, VIP 192.0.2.0) refused: spec.listeners[0]: nope"
    )
    assert reflected == {
        "type": "layerlb.dev/LoadBalancerReady",
        "status": "False",
        "reason": "Pending",
        "message": "LoadBalancer shop/svc-web (L4 proxy, VIP 192.0.2.0): 0/1 forwarding pods serve generation 1",
    }
    assert decision.ingress[0]["ipMode"] == "VIP"


def test_a_user_load_balancer_of_the_derived_name_is_name_in_use_and_never_touched() -> None:
    desired = _decide(_service()).loadbalancer
    assert desired is not None
    theirs = _stored({**desired, "metadata": {"name": "svc-web", "namespace": "shop"}})
    decision = _decide(_service(), theirs)
    assert decision.loadbalancer is None and not decision.remove_loadbalancer
    accepted = decision.conditions[1]
    assert (accepted["status"], accepted["reason"]) == ("False", "NameInUse")
    assert "LoadBalancer shop/svc-web exists and is not this Service's" in accepted["message"]
    assert decision.ingress[0]["ipMode"] == "VIP"
    # ...nor removed when the Service stops asking for an architecture.
    assert not _decide(_service(None), theirs).remove_loadbalancer


def test_the_derived_load_balancer_goes_when_the_annotation_goes_or_cannot_be_served() -> None:
    desired = _decide(_service()).loadbalancer
    assert desired is not None
    ours = _stored(desired)
    for service in (
        _service(None),
        _service("magic"),
        _service(ports=[{"port": 80}, {"port": 81}]),
    ):
        decision = _decide(service, ours)
        assert decision.loadbalancer is None and decision.remove_loadbalancer
        assert decision.ingress == [{"ip": "192.0.2.0", "ipMode": "VIP"}]  # the address stays


def test_an_unchanged_derived_load_balancer_is_up_to_date_and_a_dropped_field_is_not() -> None:
    desired = service_loadbalancer.translate(
        _service("nat", annotations={ENGINE_ANNOTATION: "nftables"}), "nat", ("192.0.2.10",)
    )
    stored = _stored(desired)
    assert service_loadbalancer.up_to_date(stored, desired)
    plain = service_loadbalancer.translate(_service("nat"), "nat", ("192.0.2.10",))
    assert not service_loadbalancer.up_to_date(stored, plain)  # engine to be written away
    moved = service_loadbalancer.translate(_service("nat"), "nat", ("192.0.2.11",))
    assert not service_loadbalancer.up_to_date(_stored(plain), moved)


def test_a_service_and_its_derived_load_balancer_share_the_address_and_nobody_else_does() -> None:
    desired = _decide(_service()).loadbalancer
    assert desired is not None
    ours = _stored(desired)
    service_owner = service_frontend.owner_of("shop", "web")
    assert service_loadbalancer.sharing_owner(ours) == service_owner
    # Whichever of the two the ledger lists as the holder, each side keeps the address.
    for holder in (service_owner, "shop/svc-web"):
        holders = {"192.0.2.0": holder}
        shared = vips.shared(holders, service_loadbalancer.sharing_owner(ours))
        vip = vips.allocate(
            owner="shop/svc-web", namespace="shop", requested="192.0.2.0", pool_name=None, current=None,
            pools=[POOL], holders=shared,
        )  # fmt: skip
        assert vip == "192.0.2.0"
        with_lb = _service()
        with_lb["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.0", "ipMode": "Proxy"}]}}
        assert _decide(with_lb, ours, holders=holders).addresses == ("192.0.2.0",)
    # Another LoadBalancer, or one merely claiming the Service as its owner under another name, does not.
    impostor = {**ours, "metadata": {**ours["metadata"], "name": "grabber"}}
    assert service_loadbalancer.sharing_owner(impostor) is None
    with pytest.raises(Unresolvable, match="already the VIP of Service shop/web"):
        vips.allocate(
            owner="shop/grabber", namespace="shop", requested="192.0.2.0", pool_name=None, current=None,
            pools=[POOL], holders=vips.shared({"192.0.2.0": service_owner}, None),
        )  # fmt: skip
    # A Service whose derived name a user's LoadBalancer holds does not share with it.
    theirs = {**ours, "metadata": {"name": "svc-web", "namespace": "shop"}}
    assert _decide(_service(), theirs, holders={"192.0.2.0": "shop/svc-web"}).addresses == ("192.0.2.1",)


def test_an_engine_without_an_architecture_is_refused_aloud_and_kube_proxy_forwards() -> None:
    decision = _decide(_service(None, annotations={"layerlb.dev/engine": "nftables"}))
    assert decision.loadbalancer is None
    accepted = decision.conditions[1]
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidEngine")
    assert accepted["message"].startswith(
        "metadata.annotations[layerlb.dev/engine]: 'nftables' takes effect only with "
        "metadata.annotations[layerlb.dev/architecture] (nat, dsr or tunnel)"
    )
    assert decision.ingress[0]["ipMode"] == "VIP"

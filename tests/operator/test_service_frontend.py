"""Services of type LoadBalancer: which ones layerlb serves, one address per family from the pools it may
use, requests honoured or refused with the field, the value and what would be valid, one ledger with
LoadBalancers."""

from __future__ import annotations

from typing import Any

import pytest
from layerlb_operator import main, service_frontend, vips
from layerlb_operator.service_frontend import ADDRESSES_ANNOTATION, ARCHITECTURE_ANNOTATION, POOL_ANNOTATION

from layerlb.resolve import Unresolvable


def _pool(name: str, *addresses: str, namespaces: list[str] | None = None, auto: bool = True) -> vips.Pool:
    spec: dict[str, Any] = {"addresses": list(addresses), "autoAssign": auto}
    if namespaces is not None:
        spec["namespaces"] = namespaces
    return vips.pool_from(
        {"apiVersion": "layerlb.dev/v1alpha1", "kind": "VIPPool", "metadata": {"name": name}, "spec": spec}
    )


V4 = _pool("public", "192.0.2.0/30")
V6 = _pool("public6", "2001:db8::/126")


def _service(
    name: str = "web",
    *,
    families: tuple[str, ...] = ("IPv4",),
    policy: str = "SingleStack",
    annotations: dict[str, str] | None = None,
    cls: str | None = service_frontend.CLASS,
    kind: str = "LoadBalancer",
    ingress: list[str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "generation": 1, "annotations": annotations or {}},
        "spec": {"type": kind, "ipFamilies": list(families), "ipFamilyPolicy": policy, **spec},
    }
    if cls is not None:
        body["spec"]["loadBalancerClass"] = cls
    if ingress:
        body["status"] = {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"} for ip in ingress]}}
    return body


def _decide(
    service: dict[str, Any], pools: list[vips.Pool] | None = None, holders: dict[str, str] | None = None
) -> service_frontend.Decision:
    return service_frontend.decide(service, pools=[V4, V6] if pools is None else pools, holders=holders or {})


def _refusal(service: dict[str, Any], **kwargs: Any) -> tuple[str, str]:
    decision = _decide(service, **kwargs)
    assert decision.addresses == () and decision.ingress == []
    assigned = decision.conditions[0]
    assert assigned["type"] == service_frontend.ADDRESS_ASSIGNED and assigned["status"] == "False"
    assert decision.refusal == assigned["reason"]
    return assigned["reason"], assigned["message"]


def test_layerlb_serves_its_class_and_classless_services_only_when_asked() -> None:
    assert service_frontend.served(_service(), serve_classless=False)
    assert not service_frontend.served(_service(cls=None), serve_classless=False)
    assert service_frontend.served(_service(cls=None), serve_classless=True)
    assert not service_frontend.served(_service(cls="example.com/other"), serve_classless=True)
    assert not service_frontend.served(_service(kind="ClusterIP"), serve_classless=True)
    deleting = _service()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not service_frontend.served(deleting, serve_classless=True)


def test_the_operator_flag_names_the_same_class() -> None:
    assert main.CLASS == service_frontend.CLASS


def test_a_single_stack_service_gets_one_address_of_its_family_announced_for_kube_proxy() -> None:
    decision = _decide(_service())
    assert decision.addresses == ("192.0.2.0",)
    assert decision.ingress == [{"ip": "192.0.2.0", "ipMode": "VIP"}]
    assigned, architecture = decision.conditions
    assert (assigned["status"], assigned["reason"]) == ("True", "AddressAssigned")
    assert "192.0.2.0 (VIPPool public)" in assigned["message"]
    assert (architecture["type"], architecture["status"], architecture["reason"]) == (
        service_frontend.ARCHITECTURE_ACCEPTED,
        "True",
        "KubeProxy",
    )
    v6 = _decide(_service(families=("IPv6",)))
    assert v6.addresses == ("2001:db8::",)


def test_dual_stack_follows_ip_family_policy_and_order() -> None:
    both = ("IPv6", "IPv4")
    assert _decide(_service(families=both, policy="RequireDualStack")).addresses == (
        "2001:db8::",
        "192.0.2.0",
    )
    assert _decide(_service(families=both, policy="PreferDualStack")).addresses == ("2001:db8::", "192.0.2.0")
    # Prefer: one family when the pools have only one.
    assert _decide(_service(families=both, policy="PreferDualStack"), pools=[V4]).addresses == ("192.0.2.0",)
    # Require: both, or a refusal naming the missing family.
    reason, message = _refusal(_service(families=both, policy="RequireDualStack"), pools=[V4])
    assert reason == "NoVIPPool"
    assert "IPv6" in message and "RequireDualStack" in message and "spec.ipFamilies" in message


def test_an_address_is_asked_for_by_annotation_one_per_family() -> None:
    annotations = {ADDRESSES_ANNOTATION: "192.0.2.2, 2001:db8::3"}
    decision = _decide(
        _service(families=("IPv4", "IPv6"), policy="RequireDualStack", annotations=annotations)
    )
    assert decision.addresses == ("192.0.2.2", "2001:db8::3")
    assert decision.warnings == []


def test_the_deprecated_load_balancer_ip_is_honoured_with_a_warning() -> None:
    decision = _decide(_service(loadBalancerIP="192.0.2.3"))
    assert decision.addresses == ("192.0.2.3",)
    [warning] = decision.warnings
    assert (warning.type, warning.reason) == ("Warning", "DeprecatedLoadBalancerIP")
    assert ADDRESSES_ANNOTATION in warning.message and "192.0.2.3" in warning.message


def test_an_address_outside_every_usable_pool_is_refused_naming_the_pools() -> None:
    reason, message = _refusal(_service(annotations={ADDRESSES_ANNOTATION: "198.51.100.7"}))
    assert reason == "AddressNotInPool"
    assert message.startswith(f"metadata.annotations[{ADDRESSES_ANNOTATION}]: 198.51.100.7 is in no VIPPool")
    assert "public (192.0.2.0-192.0.2.3)" in message
    # A pool that does not serve the namespace does not count.
    other = _pool("elsewhere", "198.51.100.0/30", namespaces=["other"])
    assert _refusal(_service(annotations={ADDRESSES_ANNOTATION: "198.51.100.1"}), pools=[V4, other])[0] == (
        "AddressNotInPool"
    )
    # Through spec.loadBalancerIP, the message names that field.
    assert _refusal(_service(loadBalancerIP="198.51.100.7"))[1].startswith(
        "spec.loadBalancerIP: 198.51.100.7"
    )


def test_an_address_of_the_wrong_family_is_refused() -> None:
    reason, message = _refusal(_service(annotations={ADDRESSES_ANNOTATION: "2001:db8::1"}))
    assert reason == "AddressFamilyMismatch"
    assert "2001:db8::1 is IPv6 but the Service's spec.ipFamilies is [IPv4]" in message
    assert "PreferDualStack" in message


def test_malformed_address_annotations_are_refused() -> None:
    assert (
        "'not-an-ip' is not an IP address"
        in _refusal(_service(annotations={ADDRESSES_ANNOTATION: "not-an-ip"}))[1]
    )
    reason, message = _refusal(_service(annotations={ADDRESSES_ANNOTATION: "192.0.2.1,192.0.2.2"}))
    assert reason == "InvalidAddresses" and "both IPv4" in message


def test_an_address_held_by_a_load_balancer_or_another_service_is_in_use() -> None:
    annotations = {ADDRESSES_ANNOTATION: "192.0.2.1"}
    reason, message = _refusal(_service(annotations=annotations), holders={"192.0.2.1": "shop/db"})
    assert reason == "AddressInUse"
    assert "192.0.2.1 is already held by LoadBalancer shop/db" in message
    other = service_frontend.owner_of("shop", "api")
    assert (
        "held by Service shop/api"
        in _refusal(_service(annotations=annotations), holders={"192.0.2.1": other})[1]
    )
    # Automatic allocation skips addresses LoadBalancers hold.
    assert _decide(_service(), holders={"192.0.2.0": "shop/db"}).addresses == ("192.0.2.1",)


def test_a_load_balancer_cannot_take_an_address_a_service_holds() -> None:
    ledger = vips.Ledger()
    service = _service(ingress=["192.0.2.0"])
    statuses = {service_frontend.owner_of("shop", "web"): service_frontend.ledger_entry(service, False)}
    holders = ledger.holders(statuses)
    with pytest.raises(Unresolvable) as refused:
        vips.allocate(
            owner="shop/db", namespace="shop", requested="192.0.2.0", pool_name=None, current=None,
            pools=[V4], holders=holders,
        )  # fmt: skip
    assert "192.0.2.0 is already the VIP of Service shop/web" in str(refused.value)
    free = vips.allocate(
        owner="shop/db",
        namespace="shop",
        requested=None,
        pool_name=None,
        current=None,
        pools=[V4],
        holders=holders,
    )
    assert free == "192.0.2.1"


def test_another_implementations_addresses_are_not_in_the_ledger() -> None:
    assert service_frontend.ledger_entry(_service(cls="example.com/other", ingress=["192.0.2.0"]), True) == ()
    released = _service(kind="ClusterIP", ingress=["192.0.2.0"])
    assert service_frontend.ledger_entry(released, False) == ()
    released["metadata"]["finalizers"] = [service_frontend.FINALIZER]
    assert service_frontend.ledger_entry(released, False) == ("192.0.2.0",)


def test_an_assigned_address_is_kept_while_eligible_and_moves_when_not() -> None:
    assert _decide(_service(ingress=["192.0.2.2"])).addresses == ("192.0.2.2",)
    other = _pool("other", "198.51.100.0/30")
    moved = _decide(
        _service(ingress=["192.0.2.2"], annotations={POOL_ANNOTATION: "other"}), pools=[V4, other]
    )
    assert moved.addresses == ("198.51.100.0",)


def test_the_pool_annotation_picks_the_pool_which_must_exist_and_serve_the_namespace() -> None:
    manual = _pool("manual", "203.0.113.0/30", auto=False)
    assert _decide(_service(annotations={POOL_ANNOTATION: "manual"}), pools=[V4, manual]).addresses == (
        "203.0.113.0",
    )
    reason, message = _refusal(_service(annotations={POOL_ANNOTATION: "nope"}))
    assert reason == "PoolNotFound"
    assert message == (
        f"metadata.annotations[{POOL_ANNOTATION}]: VIPPool 'nope' not found; "
        "VIPPools serving namespace shop: public, public6"
    )
    fenced = _pool("fenced", "203.0.113.0/30", namespaces=["other"])
    assert (
        _refusal(_service(annotations={POOL_ANNOTATION: "fenced"}), pools=[V4, fenced])[0] == "PoolNotAllowed"
    )
    # autoAssign: false pools give addresses only when named.
    assert _refusal(_service(), pools=[manual])[0] == "NoVIPPool"


def test_an_exhausted_pool_says_how_many_addresses_are_in_use() -> None:
    tiny = _pool("tiny", "192.0.2.9/32")
    reason, message = _refusal(_service(), pools=[tiny], holders={"192.0.2.9": "shop/db"})
    assert reason == "PoolExhausted"
    assert message == "spec.ipFamilies: no free IPv4 address in VIPPool(s) tiny: all 1 are in use"


def test_the_architecture_annotation_is_validated_on_its_own_condition_keeping_the_address() -> None:
    decision = _decide(_service(annotations={ARCHITECTURE_ANNOTATION: "magic"}))
    assert decision.addresses == ("192.0.2.0",)
    assigned, architecture = decision.conditions
    assert assigned["status"] == "True"
    assert (architecture["status"], architecture["reason"]) == ("False", "InvalidArchitecture")
    assert architecture["message"] == (
        f"metadata.annotations[{ARCHITECTURE_ANNOTATION}]: 'magic' is not an architecture; valid: nat, dsr, "
        "tunnel, proxy (or no annotation: the cluster's kube-proxy forwards the address)"
    )


def test_a_valid_architecture_gets_a_derived_load_balancer_with_the_ip_mode_of_its_forwarding() -> None:
    """The translation itself is in test_service_loadbalancer.py."""
    modes = {}
    for architecture in service_frontend.ARCHITECTURES:
        port = {"name": "http", "port": 80, "targetPort": 80}
        decision = _decide(_service(annotations={ARCHITECTURE_ANNOTATION: architecture}, ports=[port]))
        condition = decision.conditions[1]
        assert (condition["status"], condition["reason"]) == ("True", "LoadBalancerCreated"), condition
        assert decision.loadbalancer is not None and decision.loadbalancer["spec"]["vip"] == "192.0.2.0"
        modes[architecture] = decision.ingress[0]["ipMode"]
    # Proxy for every architecture: layerlb forwards the address, kube-proxy must keep off it.
    assert modes == {"nat": "Proxy", "dsr": "Proxy", "tunnel": "Proxy", "proxy": "Proxy"}


def test_ledger_holds_several_addresses_per_service_and_releases_them_together() -> None:
    ledger = vips.Ledger()
    owner = service_frontend.owner_of("shop", "web")
    ledger.claim(owner, ("192.0.2.0", "2001:db8::"))
    assert ledger.holders({}) == {"192.0.2.0": owner, "2001:db8::": owner}
    ledger.claim(owner, ())
    assert ledger.holders({owner: ("192.0.2.0",)}) == {}


def test_a_service_a_load_balancer_controls_is_left_to_that_load_balancer() -> None:
    """A pod-network LoadBalancer's VIP Service (objects.vip_service) carries the LoadBalancer's address, which
    the LoadBalancer holds: the front end neither serves it nor counts it in the ledger."""
    owned = {
        "metadata": {
            "name": "web-dataplane",
            "namespace": "shop",
            "ownerReferences": [
                {
                    "apiVersion": "layerlb.dev/v1alpha1",
                    "kind": "LoadBalancer",
                    "name": "web",
                    "controller": True,
                }
            ],
        },
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "layerlb.dev/loadbalancer"},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "VIP"}]}},
    }
    assert service_frontend.load_balancers_own(owned)
    assert not service_frontend.served(owned, serve_classless=True)
    assert service_frontend.ledger_entry(owned, serve_classless=True) == ()
    user = {**owned, "metadata": {"name": "web", "namespace": "shop"}}
    assert service_frontend.served(user, serve_classless=False)

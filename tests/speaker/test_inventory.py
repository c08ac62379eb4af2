"""Kubernetes objects → VIPs and eligible nodes, without an API server (the objects as the API sends them)."""

from __future__ import annotations

import ipaddress
from typing import Any

from layerlb_operator import objects
from layerlb_speaker import inventory


def node(name: str, ready: bool = True, ip: str = "", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "addresses": [{"type": "Hostname", "address": name}]
            + ([{"type": "InternalIP", "address": ip}] if ip else []),
        },
    }


def pod(lb: str, on: str, ready: bool = True, namespace: str = "shop", **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": f"{lb}-{on}", "labels": objects.labels(lb), **meta},
        "spec": {"nodeName": on},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def loadbalancer(name: str, vip: str | None, namespace: str = "shop") -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}"},
        "status": {"vip": vip} if vip else {},
    }


def service(
    name: str, ips: list[str], policy: str = "Cluster", cls: str | None = inventory.SERVICE_CLASS
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "LoadBalancer", "externalTrafficPolicy": policy}
    if cls:
        spec["loadBalancerClass"] = cls
    return {
        "metadata": {"namespace": "default", "name": name, "uid": f"uid-{name}"},
        "spec": spec,
        "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}},
    }


def endpoint_slice(service_name: str, endpoints: list[tuple[str, bool | None]]) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "default",
            "name": f"{service_name}-abc",
            "labels": {inventory.SERVICE_NAME_LABEL: service_name},
        },
        "endpoints": [
            {
                "addresses": ["10.1.0.1"],
                "nodeName": on,
                "conditions": {} if ready is None else {"ready": ready},
            }
            for on, ready in endpoints
        ],
    }


NODES = [
    node("n1", ip="10.0.0.1"),
    node("n2", ip="10.0.0.2"),
    node("n3", ready=False, ip="10.0.0.3"),
    node("n4", labels={inventory.EXCLUDE_LABEL: ""}),
]


def eligible(vips: tuple[Any, ...]) -> dict[str, set[str]]:
    return {str(vip.address): set(vip.eligible) for vip in vips}


def test_a_loadbalancer_is_eligible_where_its_forwarding_pods_are_ready() -> None:
    pods = [
        pod("web", "n1"),
        pod("web", "n2", ready=False),
        pod("web", "n3", deletionTimestamp="now"),
        pod("api", "n2"),
    ]
    vips = inventory.vips(
        NODES, [loadbalancer("web", "192.0.2.10"), loadbalancer("idle", None)], pods, [], []
    )
    assert eligible(vips) == {"192.0.2.10": {"n1"}}
    [web] = vips
    assert str(web.owners[0]) == "LoadBalancer shop/web" and web.owners[0].uid == "uid-web"


def test_a_long_loadbalancer_name_matches_its_pods_through_the_operators_label_value() -> None:
    name = "a-very-long-loadbalancer-name-that-does-not-fit-in-one-kubernetes-label-value-at-all"
    vips = inventory.vips(NODES, [loadbalancer(name, "192.0.2.11")], [pod(name, "n2")], [], [])
    assert eligible(vips) == {"192.0.2.11": {"n2"}}


def test_a_cluster_policy_service_is_eligible_on_every_ready_node_not_excluded() -> None:
    vips = inventory.vips(NODES, [], [], [service("web", ["192.0.2.20", "2001:db8::20"])], [])
    assert eligible(vips) == {"192.0.2.20": {"n1", "n2"}, "2001:db8::20": {"n1", "n2"}}


def test_a_local_policy_service_is_eligible_where_it_has_ready_endpoints() -> None:
    slices = [endpoint_slice("web", [("n1", False), ("n2", None), ("n3", True)])]
    vips = inventory.vips(NODES, [], [], [service("web", ["192.0.2.21"], policy="Local")], slices)
    assert eligible(vips) == {"192.0.2.21": {"n2"}}  # n1 not ready, n3's node not Ready


def test_services_of_other_classes_are_left_alone_and_classless_ones_only_when_asked() -> None:
    services = [
        service("theirs", ["192.0.2.30"], cls="example.com/other"),
        service("plain", ["192.0.2.31"], cls=None),
    ]
    assert inventory.vips(NODES, [], [], services, []) == ()
    assert eligible(inventory.vips(NODES, [], [], services, [], classless=True)) == {
        "192.0.2.31": {"n1", "n2"}
    }


def test_one_address_claimed_twice_is_announced_once_by_the_union_of_nodes() -> None:
    vips = inventory.vips(
        NODES,
        [loadbalancer("web", "192.0.2.40")],
        [pod("web", "n1")],
        [service("web", ["192.0.2.40"], policy="Local")],
        [endpoint_slice("web", [("n2", True)])],
    )
    [vip] = vips
    assert vip.address == ipaddress.ip_address("192.0.2.40") and vip.eligible == {"n1", "n2"}
    assert [o.kind for o in vip.owners] == ["LoadBalancer", "Service"]


def test_peers_are_the_nodes_internal_ips() -> None:
    dual = node("n5", ip="fd00::5")
    dual["status"]["addresses"].append({"type": "InternalIP", "address": "10.0.0.5"})
    assert inventory.peers([*NODES, dual]) == {
        "n1": "10.0.0.1",
        "n2": "10.0.0.2",
        "n3": "10.0.0.3",
        "n5": "10.0.0.5",
    }

"""Every pod layerlb runs, as rendered by the Helm chart and built by the operator, against one table of
privileges (docs/security.md, "Privileges of each process"). A new pod, a new capability or a lost
hardening setting fails here; the same pods meet the API server's Pod Security admission in
e2e/test_security.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from layerlb_operator import objects

from layerlb import api, validation
from tests.test_chart import documents, template


@dataclass(frozen=True)
class Expected:
    """What one pod may do: its user, the capabilities it adds, whether it shares the node's network."""

    root: bool
    add: tuple[str, ...]
    host_network: bool


FORWARDING: dict[tuple[str, str, int], Expected] = {
    # (mode, architecture, listener port)
    ("L7", "proxy", 8080): Expected(root=False, add=(), host_network=False),
    ("L7", "proxy", 443): Expected(root=False, add=(), host_network=False),  # a pod sysctl, no capability
    ("L4", "proxy", 5432): Expected(root=False, add=(), host_network=False),
    ("L4", "nat", 80): Expected(root=True, add=("NET_ADMIN", "NET_RAW"), host_network=True),
    ("L4", "dsr", 80): Expected(root=True, add=("NET_ADMIN", "NET_RAW"), host_network=True),
    ("L4", "tunnel", 80): Expected(root=True, add=("NET_ADMIN", "NET_RAW"), host_network=True),
    ("L7", "transparent", 8080): Expected(root=True, add=("NET_ADMIN", "NET_RAW"), host_network=True),
    ("L7", "transparent", 80): Expected(
        root=True, add=("NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"), host_network=True
    ),
}
CHART: dict[tuple[str, str], Expected] = {
    # (values, workload kind)
    ("default", "Deployment"): Expected(root=False, add=(), host_network=False),  # the operator
    ("default", "DaemonSet"): Expected(root=True, add=("NET_RAW",), host_network=True),  # the L2 speaker
    ("bgp", "Deployment"): Expected(root=False, add=(), host_network=False),
    ("bgp", "DaemonSet"): Expected(root=True, add=("NET_RAW", "NET_BIND_SERVICE"), host_network=True),
}


def forwarding_pod(mode: str, architecture: str, port: int) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"address": "10.1.0.5"}
    if architecture not in ("dsr", "tunnel"):
        endpoint["port"] = 9000
    protocol = {"L7": "HTTP", "L4": "TCP"}[mode]
    document = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "shop", "generation": 1},
        "spec": {
            "mode": mode,
            "architecture": architecture,
            "listeners": [{"name": "main", "port": port, "protocol": protocol}],
            "backends": [{"name": "app", "endpoints": [endpoint]}],
            "defaultBackend": "app",
        },
    }
    resource = validation.validate(document)
    assert isinstance(resource, api.LoadBalancer)
    built = objects.deployment("shop", "web", "uid-1", resource.spec, objects.Settings())
    pod: dict[str, Any] = built["spec"]["template"]["spec"]
    return pod


def chart_pod(values: str, kind: str) -> dict[str, Any]:
    extra = ["--set", "speaker.bgp.enabled=true"] if values == "bgp" else []
    [workload] = [d for d in documents(template(*extra)) if d["kind"] == kind]
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def assert_hardened(pod: dict[str, Any], expected: Expected) -> None:
    """The settings every layerlb pod shares, and the privileges `expected` allows, nothing more."""
    [container] = pod["containers"]
    security = container["securityContext"]
    pod_security = pod.get("securityContext", {})
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security.get("privileged", False) is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert tuple(security["capabilities"].get("add", ())) == expected.add
    seccomp = security.get("seccompProfile") or pod_security.get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot", False))
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    if expected.root:
        assert user == 0 and run_as_non_root is False
    else:
        assert run_as_non_root is True and user == 65532
    assert pod.get("hostNetwork", False) is expected.host_network
    for shared in ("hostPID", "hostIPC"):
        assert not pod.get(shared, False)
    for volume in pod.get("volumes", []):  # scratch space in memory, nothing of the node's
        assert set(volume) == {"name", "emptyDir"} and volume["emptyDir"]["medium"] == "Memory"
    assert "hostPort" not in repr(container.get("ports", []))
    sysctls = {entry["name"] for entry in pod_security.get("sysctls", [])}
    assert sysctls <= {"net.ipv4.ip_unprivileged_port_start"}  # in Kubernetes' safe, per-pod set


@pytest.mark.parametrize(("mode", "architecture", "port"), list(FORWARDING))
def test_forwarding_pods_hold_only_what_their_architecture_needs(
    mode: str, architecture: str, port: int
) -> None:
    assert_hardened(forwarding_pod(mode, architecture, port), FORWARDING[(mode, architecture, port)])


@pytest.mark.parametrize(("values", "kind"), list(CHART))
def test_the_charts_pods_hold_only_what_they_need(values: str, kind: str) -> None:
    assert_hardened(chart_pod(values, kind), CHART[(values, kind)])


def test_the_chart_runs_no_other_pods() -> None:
    for extra in ([], ["--set", "speaker.bgp.enabled=true"]):
        kinds = {d["kind"] for d in documents(template(*extra))}
        assert kinds & {"Pod", "Job", "CronJob", "StatefulSet", "ReplicaSet"} == set()
        assert sorted(
            d["kind"] for d in documents(template(*extra)) if d["kind"] in ("Deployment", "DaemonSet")
        ) == [
            "DaemonSet",
            "Deployment",
        ]


@pytest.mark.parametrize(("mode", "port"), [("L7", 8080), ("L4", 5432)])
def test_a_pod_network_vip_carries_the_listener_ports_only(mode: str, port: int) -> None:
    """The VIP reaches pod-network forwarding pods through their VIP Service: its ports are the listeners',
    so a client of the VIP never reaches the admin port, and it allocates no node port."""
    endpoint = {"address": "10.1.0.5", "port": 9000}
    document = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "shop", "generation": 1},
        "spec": {
            "mode": mode,
            "architecture": "proxy",
            "listeners": [{"name": "main", "port": port, "protocol": {"L7": "HTTP", "L4": "TCP"}[mode]}],
            "backends": [{"name": "app", "endpoints": [endpoint]}],
            "defaultBackend": "app",
        },
    }
    resource = validation.validate(document)
    assert isinstance(resource, api.LoadBalancer)
    service = objects.vip_service("shop", "web", "uid-1", resource.spec, "192.0.2.10")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, port)]
    assert objects.ADMIN_PORT not in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["allocateLoadBalancerNodePorts"] is False

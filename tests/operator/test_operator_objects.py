"""Each LoadBalancer gets its Plan ConfigMap, RBAC and Deployment, owned by it, privileged only where needed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from layerlb_operator import objects

from layerlb import api, validation

KERNEL_OR_TRANSPARENT = [("L4", "nat"), ("L4", "dsr"), ("L4", "tunnel"), ("L7", "transparent")]
UNPRIVILEGED = [("L4", "proxy"), ("L7", "proxy")]


def _lb(
    mode: str = "L7", architecture: str = "proxy", port: int = 8080, name: str = "web", **spec: Any
) -> api.LoadBalancer:
    protocol = "HTTP" if mode == "L7" else "TCP"
    endpoint: dict[str, Any] = {"address": "10.1.0.5"}
    if architecture not in ("dsr", "tunnel"):
        endpoint["port"] = 9000
    document = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": name, "namespace": "shop", "generation": 1},
        "spec": {
            "mode": mode,
            "architecture": architecture,
            "listeners": [{"name": "main", "port": port, "protocol": protocol}],
            "backends": [{"name": "app", "endpoints": [endpoint]}],
            "defaultBackend": "app",
            **spec,
        },
    }
    resource = validation.validate(document)
    assert isinstance(resource, api.LoadBalancer)
    return resource


def _objects(
    resource: api.LoadBalancer, settings: objects.Settings | None = None
) -> dict[str, dict[str, Any]]:
    built = objects.desired(resource, "uid-1", '{"plan": 1}\n', settings or objects.Settings())
    by_kind: dict[str, dict[str, Any]] = {}
    for obj in built:  # the Plan ConfigMap under "ConfigMap", the report one under its name
        by_kind[obj["metadata"]["name"] if obj["kind"] in by_kind else obj["kind"]] = obj
    return by_kind


def _pod(resource: api.LoadBalancer) -> dict[str, Any]:
    spec: dict[str, Any] = _objects(resource)["Deployment"]["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize(("mode", "architecture"), UNPRIVILEGED)
def test_proxy_architectures_run_unprivileged(mode: str, architecture: str) -> None:
    pod = _pod(_lb(mode, architecture))
    container = pod["containers"][0]["securityContext"]
    assert "hostNetwork" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


@pytest.mark.parametrize(("mode", "architecture"), UNPRIVILEGED + KERNEL_OR_TRANSPARENT)
def test_pod_network_pods_bind_any_address_and_the_transparent_proxy_binds_its_vip_before_it_is_local(
    mode: str, architecture: str
) -> None:
    pod = _pod(_lb(mode, architecture))
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    # Pod network: kube-proxy delivers the VIP's packets to the pod's own address (the VIP Service).
    # Kernel engines put the VIP on their node before anything binds it; the transparent proxy puts it on
    # its node's loopback after checking its listeners.
    assert env.get("LAYERLB_BIND_ANY") == (None if pod.get("hostNetwork") else "1")
    assert env.get("LAYERLB_FREEBIND") == ("1" if architecture == "transparent" else None)


def _vip_service(resource: api.LoadBalancer, vip: str) -> dict[str, Any] | None:
    built = objects.desired(resource, "uid-1", "{}", objects.Settings(), vip=vip)
    return next((o for o in built if o["kind"] == "Service"), None)


@pytest.mark.parametrize(("mode", "architecture"), UNPRIVILEGED)
def test_a_pod_network_load_balancer_gets_its_vip_to_its_pods_through_a_service_kube_proxy_forwards(
    mode: str, architecture: str
) -> None:
    resource = _lb(mode, architecture, listeners=[
        {"name": "a", "port": 8080, "protocol": "HTTP" if mode == "L7" else "TCP"},
        *([{"name": "dns", "port": 53, "protocol": "UDP"}] if mode == "L4" else []),
    ])  # fmt: skip
    service = _vip_service(resource, "192.0.2.10")
    assert service is not None
    assert service["metadata"]["name"] == "web-dataplane"
    assert service["metadata"]["ownerReferences"][0]["kind"] == "LoadBalancer"
    assert service["spec"] == {
        "type": "LoadBalancer",
        "loadBalancerClass": "layerlb.dev/loadbalancer",
        "allocateLoadBalancerNodePorts": False,
        "externalTrafficPolicy": "Local",
        "ipFamilyPolicy": "SingleStack",
        "ipFamilies": ["IPv4"],
        "selector": objects.selector("web"),
        "ports": [
            {"name": "a", "port": 8080, "targetPort": 8080, "protocol": "TCP"},
            *([{"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"}] if mode == "L4" else []),
        ],
    }
    assert service["status"] == {"loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "VIP"}]}}
    six = _vip_service(resource, "2001:db8::10")
    assert six is not None and six["spec"]["ipFamilies"] == ["IPv6"]


@pytest.mark.parametrize(("mode", "architecture"), KERNEL_OR_TRANSPARENT)
def test_host_network_load_balancers_get_no_vip_service(mode: str, architecture: str) -> None:
    assert _vip_service(_lb(mode, architecture), "192.0.2.10") is None


@pytest.mark.parametrize(("mode", "architecture"), KERNEL_OR_TRANSPARENT)
def test_kernel_and_transparent_architectures_get_the_host_network_and_net_admin_only(
    mode: str, architecture: str
) -> None:
    pod = _pod(_lb(mode, architecture))
    container = pod["containers"][0]["securityContext"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert container["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}


def test_ports_below_1024_need_a_sysctl_when_unprivileged_and_net_bind_service_when_transparent() -> None:
    assert _pod(_lb(port=80))["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}
    ]
    assert "sysctls" not in _pod(_lb(port=8080))["securityContext"]
    transparent = _pod(_lb("L7", "transparent", port=80))["containers"][0]["securityContext"]
    assert transparent["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"]
    kernel = _pod(_lb("L4", "nat", port=80))["containers"][0]["securityContext"]
    assert kernel["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]  # IPVS forwards; nothing listens


def test_every_object_is_owned_by_the_load_balancer_and_labelled() -> None:
    for obj in _objects(_lb()).values():
        meta = obj["metadata"]
        assert meta["namespace"] == "shop"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "layerlb.dev/v1alpha1",
                "kind": "LoadBalancer",
                "name": "web",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/name"] == "layerlb"
        assert meta["labels"]["app.kubernetes.io/instance"] == "web"
        assert meta["labels"]["layerlb.dev/loadbalancer"] == "web"


def test_the_plan_configmap_holds_the_plan_json_and_names_where_pods_report() -> None:
    config_map = _objects(_lb())["ConfigMap"]
    assert config_map["metadata"]["name"] == "web-plan"
    assert json.loads(config_map["data"]["plan.json"]) == {"plan": 1}
    assert config_map["metadata"]["annotations"] == {"layerlb.dev/serving-configmap": "web-serving"}


def test_the_serving_configmap_is_created_without_data_so_the_pods_reports_survive_each_apply() -> None:
    built = objects.desired(_lb(), "uid-1", "{}", objects.Settings())
    kinds = [f"{o['kind']}/{o['metadata']['name']}" for o in built]
    assert kinds.index("ConfigMap/web-serving") < kinds.index("Deployment/web-dataplane")
    serving = _objects(_lb())["web-serving"]
    assert "data" not in serving
    assert serving["metadata"]["labels"]["layerlb.dev/report"] == "serving"
    assert serving["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_the_role_reads_its_own_plan_configmap_patches_its_report_and_nothing_else() -> None:
    built = _objects(_lb())
    assert built["Role"]["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["web-plan"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["web-serving"],
            "verbs": ["patch"],
        },
    ]
    binding = built["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "web-dataplane",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "web-dataplane", "namespace": "shop"}]
    assert _pod(_lb())["serviceAccountName"] == built["ServiceAccount"]["metadata"]["name"] == "web-dataplane"


def test_the_deployment_runs_the_spec_replicas_of_the_configured_image_with_probes() -> None:
    deployment = _objects(
        _lb(replicas=3), objects.Settings.from_environment({objects.IMAGE_ENV: "registry/x:1"})
    )["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"] == objects.selector("web")
    assert container["image"] == "registry/x:1"
    assert container["command"] == objects.dataplane_command("shop", "web")
    assert container["command"] == [
        "layerlb", "dataplane", "--plan-configmap", "shop/web-plan", "--admin", "0.0.0.0:9090",
    ]  # fmt: skip
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert {"name": "admin", "containerPort": 9090, "protocol": "TCP"} in container["ports"]


def test_the_default_image_is_pinned() -> None:
    assert objects.Settings.from_environment({}).image == "ghcr.io/layerlb/layerlb:0.1.0"


def test_long_names_stay_valid_and_distinct() -> None:
    first, second = "a" * 70, "a" * 69 + "b"
    assert len(objects.label_value(first)) <= 63
    assert objects.label_value(first) != objects.label_value(second)
    assert objects.label_value("web") == "web"
    long_name = "x" * 253
    assert len(objects.plan_configmap_name(long_name)) <= 253
    assert objects.plan_configmap_name(long_name) != objects.dataplane_name(long_name)


def test_the_plan_configmap_leaves_secret_keys_out_and_the_role_gets_exactly_those_secrets() -> None:
    from layerlb import plan, plan_contract

    certificate = plan.Certificate(source="Secret/shop-tls", cert_pem="CHAIN", key_pem="KEY", names=("a",))
    inline = plan.Certificate(source="file", cert_pem="CHAIN2", key_pem="KEY2")
    from tests.dataplane.helpers_runtime import l4_plan

    base = l4_plan("192.0.2.1", [("https", 443, "TCP")], [9000], name="shop", generation=1)
    listener = base.listeners[0].model_copy(update={"certificates": (certificate, inline)})
    resolved = base.model_copy(update={"listeners": (listener,)})
    stored, secrets = plan_contract.without_keys(resolved)
    kept = stored.listeners[0].certificates
    assert (kept[0].key_pem, kept[0].cert_pem, kept[0].names) == ("", "CHAIN", ("a",))
    assert kept[1] == inline  # not from a Secret: nothing to read it from
    assert secrets == ["shop-tls"]
    rules = objects.role("demo", "shop", "uid", secrets)["rules"]
    assert rules[-1] == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["shop-tls"],
        "verbs": ["get"],
    }
    assert all(rule["resources"] != ["secrets"] for rule in objects.role("demo", "shop", "uid")["rules"])

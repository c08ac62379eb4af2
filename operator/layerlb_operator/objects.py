"""The Kubernetes objects that run one LoadBalancer's data plane, built as plain dicts for server-side apply.

Per LoadBalancer: the ConfigMap `<name>-plan` holding the Plan JSON; the ConfigMap `<name>-serving`
where each forwarding pod reports the Plan generation it serves (`data[<pod name>]`; the keys and values
of both are `layerlb.plan_contract`'s); the ServiceAccount, Role and RoleBinding `<name>-dataplane` that let
the forwarding pods read (get/list/watch) the first and patch the second, by name, and nothing else; the
Deployment `<name>-dataplane`. All are owned by the LoadBalancer (controller reference), so
kube-controller-manager's garbage collector removes them with it.

Why a ConfigMap for the reports rather than annotations on the pods: RBAC cannot narrow `patch pods` to
a pod's own object (names are not known in advance), and a data plane allowed to patch pods could
relabel any pod of the namespace into or out of a Service. Patching one named ConfigMap can mislead
only this LoadBalancer's own `Ready`.

Privileges follow the architecture: the kernel ones (nat, dsr, tunnel) program IPVS or nftables and
`transparent` binds to client addresses, so they get the host's network and NET_ADMIN + NET_RAW;
everything else runs as a non-root user with no capabilities. Both have a read-only root filesystem,
no privilege escalation and the runtime's default seccomp profile.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from layerlb import api, plan_contract
from layerlb_operator import admin_ports

DEFAULT_IMAGE: Final = "ghcr.io/layerlb/layerlb:0.1.0"
IMAGE_ENV: Final = "LAYERLB_DATAPLANE_IMAGE"
ADMIN_PORT: Final = 9090
NONROOT_UID: Final = 65532
MAX_OBJECT_NAME: Final = 253
MAX_LABEL_VALUE: Final = 63

NAME_LABEL: Final = "app.kubernetes.io/name"
INSTANCE_LABEL: Final = "app.kubernetes.io/instance"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
LOADBALANCER_LABEL: Final = "layerlb.dev/loadbalancer"
SERVICE_CLASS: Final = "layerlb.dev/loadbalancer"  # the loadBalancerClass layerlb serves
REPORT_LABEL: Final = "layerlb.dev/report"  # "serving" on the ConfigMap the operator watches for reports
# On the operator (the setting) and on host-network forwarding pods ("1": enforce strict ARP).
STRICT_ARP_ENV: Final = "LAYERLB_STRICT_ARP"


@dataclass(frozen=True)
class Settings:
    """What the operator's deployment decides about the forwarding pods."""

    image: str = DEFAULT_IMAGE
    admin_port: int = ADMIN_PORT  # of pod-network forwarding pods
    host_admin_ports: range = admin_ports.DEFAULT  # host-network ones: one port each (admin_ports.py)
    # Host-network forwarding pods make their node leave ARP for loopback VIPs to the speaker (the
    # dataplane's kernel.strict_arp). Off only where nothing announces the VIPs and the nodes' own ARP
    # answers are what attracts them (one replica, no speaker, no MetalLB).
    strict_arp: bool = True

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `LAYERLB_DATAPLANE_IMAGE` (the image the operator's chart pins),
        `LAYERLB_HOST_ADMIN_PORTS` and `LAYERLB_STRICT_ARP` (`0` or `false` turns it off); ValueError for a
        malformed port range."""
        env = os.environ if environ is None else environ
        ports = env.get(admin_ports.ENV)
        return cls(
            image=env.get(IMAGE_ENV) or DEFAULT_IMAGE,
            host_admin_ports=admin_ports.parse_range(ports) if ports else admin_ports.DEFAULT,
            strict_arp=env.get(STRICT_ARP_ENV, "1").strip().lower() not in ("0", "false", "no", "off"),
        )


def _shortened(text: str, limit: int) -> str:
    """`text` when it fits, else a prefix and a hash: distinct names stay distinct and valid."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11].rstrip('-.')}-{digest}"


def child_name(name: str, suffix: str) -> str:
    """The name of an object of LoadBalancer `name`, e.g. `web-plan`, within the 253-character limit."""
    return _shortened(f"{name}-{suffix}", MAX_OBJECT_NAME)


def plan_configmap_name(name: str) -> str:
    """The ConfigMap holding the Plan of LoadBalancer `name`."""
    return child_name(name, "plan")


def serving_configmap_name(name: str) -> str:
    """The ConfigMap in which the forwarding pods of LoadBalancer `name` report what they serve."""
    return child_name(name, "serving")


def dataplane_name(name: str) -> str:
    """The Deployment, ServiceAccount, Role and RoleBinding of LoadBalancer `name`."""
    return child_name(name, "dataplane")


def label_value(name: str) -> str:
    """A LoadBalancer name as a label value (at most 63 characters)."""
    return _shortened(name, MAX_LABEL_VALUE)


def selector(name: str) -> dict[str, str]:
    """The labels that select LoadBalancer `name`'s forwarding pods (and nothing else in the namespace)."""
    return {NAME_LABEL: "layerlb", INSTANCE_LABEL: label_value(name), COMPONENT_LABEL: "dataplane"}


def labels(name: str) -> dict[str, str]:
    """The labels of every object of LoadBalancer `name`."""
    return {**selector(name), LOADBALANCER_LABEL: label_value(name), MANAGED_BY_LABEL: "layerlb-operator"}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """The controller reference that makes the LoadBalancer own (and garbage-collect) an object."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": "LoadBalancer",
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def privileged(spec: api.LoadBalancerSpec) -> bool:
    """Whether the architecture needs the host network and NET_ADMIN/NET_RAW."""
    return spec.architecture in (*api.KERNEL_ARCHITECTURES, api.Architecture.transparent)


def _low_port(spec: api.LoadBalancerSpec) -> bool:
    return any(listener.port < 1024 for listener in spec.listeners)


def dataplane_command(namespace: str, name: str, admin_port: int = ADMIN_PORT) -> list[str]:
    """The forwarding pod's command: the data plane reading its Plan from the ConfigMap through the API."""
    return [
        "layerlb",
        "dataplane",
        "--plan-configmap",
        f"{namespace}/{plan_configmap_name(name)}",
        "--admin",
        f"0.0.0.0:{admin_port}",
    ]


def _meta(name: str, namespace: str, lb_name: str, uid: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(lb_name),
        "ownerReferences": [owner_reference(lb_name, uid)],
    }


def config_map(namespace: str, name: str, uid: str, plan_json: str) -> dict[str, Any]:
    """The ConfigMap `<name>-plan` with the Plan JSON under `plan.json`, naming where pods report."""
    meta = _meta(plan_configmap_name(name), namespace, name, uid)
    meta["annotations"] = {plan_contract.SERVING_ANNOTATION: serving_configmap_name(name)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {plan_contract.PLAN_KEY: plan_json},
    }


def serving_config_map(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """The ConfigMap `<name>-serving`, created empty: its `data` belongs to the pods (the apply never names it)."""
    meta = _meta(serving_configmap_name(name), namespace, name, uid)
    meta["labels"] = {**meta["labels"], REPORT_LABEL: "serving"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}


def service_account(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """The forwarding pods' identity."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(dataplane_name(name), namespace, name, uid),
    }


def role(namespace: str, name: str, uid: str, secrets: Sequence[str] = ()) -> dict[str, Any]:
    """Read this LoadBalancer's Plan ConfigMap (list/watch narrowed by resourceNames too), patch its report,
    and get exactly the TLS `secrets` its listeners name (the private keys are read there)."""
    secret_rules = (
        [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": sorted(secrets), "verbs": ["get"]}]
        if secrets
        else []
    )
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(dataplane_name(name), namespace, name, uid),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [plan_configmap_name(name)],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [serving_configmap_name(name)],
                "verbs": ["patch"],
            },
            *secret_rules,
        ],
    }


def role_binding(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """Grants the Role to the forwarding pods' ServiceAccount."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(dataplane_name(name), namespace, name, uid),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": dataplane_name(name)},
        "subjects": [{"kind": "ServiceAccount", "name": dataplane_name(name), "namespace": namespace}],
    }


def _security(spec: api.LoadBalancerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod securityContext, container securityContext) for the architecture."""
    pod: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    container: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    if privileged(spec):
        # Capabilities take effect for root only (non-root would need file capabilities in the image).
        add = ["NET_ADMIN", "NET_RAW"]
        if spec.architecture is api.Architecture.transparent and _low_port(spec):
            add.append("NET_BIND_SERVICE")  # the transparent proxy listens itself; the kernel ones do not
        container["capabilities"] = {"drop": ["ALL"], "add": add}
        container.update(runAsUser=0, runAsNonRoot=False)
    else:
        pod.update(runAsNonRoot=True, runAsUser=NONROOT_UID, runAsGroup=NONROOT_UID, fsGroup=NONROOT_UID)
        container["runAsNonRoot"] = True
        if _low_port(spec):
            # A per-pod network namespace sysctl (in Kubernetes' safe set): ports below 1024 without root.
            pod["sysctls"] = [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    return pod, container


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "admin"},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def deployment(
    namespace: str,
    name: str,
    uid: str,
    spec: api.LoadBalancerSpec,
    settings: Settings,
    admin_port: int | None = None,
) -> dict[str, Any]:
    """The forwarding pods: `spec.replicas` of them, spread over nodes, probed on the admin server
    (`admin_port`, this LoadBalancer's own when its pods use the node's network; else the setting)."""
    pod_security, container_security = _security(spec)
    host = privileged(spec)
    admin = settings.admin_port if admin_port is None else admin_port
    ports: list[dict[str, Any]] = [{"name": "admin", "containerPort": admin, "protocol": "TCP"}]
    if not host:
        ports += [
            {"containerPort": listener.port, "protocol": api.transport(listener.protocol)}
            for listener in spec.listeners
            if listener.port != admin
        ]
    container: dict[str, Any] = {
        "name": "dataplane",
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": dataplane_command(namespace, name, admin),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": ports,
        "livenessProbe": _probe("/healthz", 10, 3),
        # Every second, so a new pod turns Ready (and its LoadBalancer with it) within a second of serving;
        # out after three failures in a row, as HAProxy's `fall 3`, so one slow answer on a busy node
        # does not take a serving pod out of its LoadBalancer.
        "readinessProbe": _probe("/readyz", 1, 3),
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
        "securityContext": container_security,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": dataplane_name(name),
        "automountServiceAccountToken": True,  # the data plane watches its ConfigMap through the API
        "securityContext": pod_security,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": selector(name)},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        },
    }
    deployment_spec: dict[str, Any] = {
        "replicas": spec.replicas,
        "selector": {"matchLabels": selector(name)},
        "template": {"metadata": {"labels": labels(name)}, "spec": pod_spec},
    }
    if not host:
        # The VIP reaches a pod-network pod through its VIP Service (`vip_service`): kube-proxy rewrites
        # the destination to the pod's own address, so its listeners take any address of the pod.
        container["env"].append({"name": "LAYERLB_BIND_ANY", "value": "1"})
    elif spec.architecture is api.Architecture.transparent:
        # The transparent proxy puts the VIP on the node's loopback itself, after its listeners are
        # checked: it binds the VIP before it is local.
        container["env"].append({"name": "LAYERLB_FREEBIND", "value": "1"})
    if host and settings.strict_arp:
        # The pod puts the VIP on the node's loopback, which the speaker announces from one node: the node's
        # own kernel must not answer ARP for it too (strict ARP, as kube-proxy's IPVS mode).
        container["env"].append({"name": STRICT_ARP_ENV, "value": "1"})
    if host:
        pod_spec.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
        # Host ports cannot surge on the same node: replace pods one at a time instead.
        deployment_spec["strategy"] = {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(dataplane_name(name), namespace, name, uid),
        "spec": deployment_spec,
    }


def vip_service(namespace: str, name: str, uid: str, spec: api.LoadBalancerSpec, vip: str) -> dict[str, Any]:
    """How a pod-network LoadBalancer's VIP reaches its forwarding pods: a Service of type LoadBalancer
    selecting them, its `status.loadBalancer.ingress` the VIP (applied to the status subresource), so
    the cluster's own kube-proxy on every node sends the VIP's packets to the pods, and layerlb's speaker
    announces the VIP from the nodes that hold a ready one.

    `externalTrafficPolicy: Local`: a node delivers only to its own forwarding pods (kube-proxy drops the
    VIP where there is none, and the speaker announces it only where there is one), so the client's
    address reaches the pod unchanged, as it would on the host network; no node ports (nothing but the
    VIP is meant to reach the pods). `ipMode: VIP`: packets reach the pods with the VIP as destination
    (kube-proxy rewrites it to the pod's address on the way in). The Service is the LoadBalancer's (its
    controller reference): the Service front end leaves it alone, the garbage collector removes it."""
    ports = [
        {
            "name": listener.name,
            "port": listener.port,
            "targetPort": listener.port,
            "protocol": "UDP" if listener.protocol is api.Protocol.UDP else "TCP",
        }
        for listener in spec.listeners
    ]
    family = "IPv6" if ":" in vip else "IPv4"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(dataplane_name(name), namespace, name, uid),
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": SERVICE_CLASS,
            "allocateLoadBalancerNodePorts": False,
            "externalTrafficPolicy": "Local",
            "ipFamilyPolicy": "SingleStack",
            "ipFamilies": [family],
            "selector": selector(name),
            "ports": ports,
        },
        "status": {"loadBalancer": {"ingress": [{"ip": vip, "ipMode": "VIP"}]}},
    }


def desired(
    resource: api.LoadBalancer,
    uid: str,
    plan_json: str,
    settings: Settings,
    admin_port: int | None = None,
    secrets: Sequence[str] = (),
    vip: str | None = None,
) -> list[dict[str, Any]]:
    """Every object of one LoadBalancer, in the order they are applied (identity and RBAC first); with
    its `vip`, a pod-network LoadBalancer's VIP Service last (host-network pods get the VIP on their node)."""
    namespace = resource.metadata.namespace or "default"
    name = resource.metadata.name
    found = [
        service_account(namespace, name, uid),
        role(namespace, name, uid, secrets),
        role_binding(namespace, name, uid),
        config_map(namespace, name, uid, plan_json),
        serving_config_map(namespace, name, uid),
        deployment(namespace, name, uid, resource.spec, settings, admin_port),
    ]
    if vip and not privileged(resource.spec):
        found.append(vip_service(namespace, name, uid, resource.spec, vip))
    return found

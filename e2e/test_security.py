"""The security review's claims about identities, on a real API server (no kubelet): docs/security.md.

Every request is real and made with a real token from the TokenRequest API (a forwarding pod's bound to
its pod, as a kubelet would request it), not `kubectl auth can-i`; writes are sent with
`--dry-run=server`, which the API server authorizes exactly as a real write but does not store, so a
test that fails leaves nothing changed behind. What is shown:
- a forwarding pod's token reads its own Plan and the TLS Secret its listener names, and nothing else:
  not another Secret of its namespace, not a list of them, not its LoadBalancer, not its own Role;
- the operator (the rules of `layerlb_operator.rbac`, which the chart renders) cannot delete, exec,
  read Nodes, write Secrets, nor grant or bind more than it holds (RBAC's escalation check);
- the chart's speaker reads a Secret in the release namespace only with BGP on, and only by name;
- Pod Security admission: the operator's and the proxy architectures' pods pass `restricted`; the
  speaker and the host-network architectures (nat, dsr, tunnel, transparent) need `privileged`, so a
  namespace that enforces `baseline` or `restricted` cannot get them.
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.harness import Operator, fresh_namespace, wait_for
from e2e.kube import Kubectl
from tests.security.test_pod_security import FORWARDING, chart_pod, forwarding_pod
from tests.test_chart import CHART, documents, helm

NS = "llb-e2e-sec"
SYSTEM_NS = "llb-e2e-sec-system"
OTHER_NS = "llb-e2e-sec-other"
LEASE = f"{NS}/layerlb-operator"
NAME = "shop"
VIP = "127.0.0.43"


def apply(kubectl: Kubectl, *manifests: dict[str, Any]) -> None:
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))


def tls_secret(folder: Path, namespace: str, name: str) -> dict[str, Any]:
    """A kubernetes.io/tls Secret with a fresh self-signed pair (openssl)."""
    cert, key = folder / f"{namespace}-{name}.crt", folder / f"{namespace}-{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "2", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=shop.example.com"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert.read_text(), "tls.key": key.read_text()},
    }


def opaque_secret(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": {"password": "not-for-layerlb"},
    }


class Identity:
    """Requests to the API server authenticated by one ServiceAccount token and nothing else: plain HTTPS,
    so each is exactly one request (kubectl would GET before a PATCH and be refused for the GET)."""

    def __init__(self, k8s: Cluster, token: str) -> None:
        cluster = yaml.safe_load(k8s.kubeconfig.read_text())["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.tls = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        self.token = token

    def status(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        """(HTTP status, body) of one request; writes are dry runs (authorized as real ones, not stored)."""
        if method != "GET":
            path += ("&" if "?" in path else "?") + "dryRun=All"
        content = "application/merge-patch+json" if method == "PATCH" else "application/json"
        request = urllib.request.Request(
            self.server + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content},
        )
        try:
            with urllib.request.urlopen(request, context=self.tls, timeout=30) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def allowed(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        code, text = self.status(method, path, body)
        assert code in (200, 201), f"{method} {path}: {code} {text[:300]}"

    def refused(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        code, text = self.status(method, path, body)
        assert code == 403, f"{method} {path} was not forbidden: {code} {text[:300]}"


def core(namespace: str, resource: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/{resource}" + (f"/{name}" if name else "")


def group(api: str, namespace: str, resource: str, name: str = "") -> str:
    return f"/apis/{api}/namespaces/{namespace}/{resource}" + (f"/{name}" if name else "")


LOADBALANCERS = "layerlb.dev/v1alpha1"
RBAC = "rbac.authorization.k8s.io/v1"
SHELL = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "shell"},
    "spec": {"containers": [{"name": "shell", "image": "busybox"}]},
}


def token(kubectl: Kubectl, account: str, namespace: str, *bound: str) -> str:
    return kubectl.ok("create", "token", account, "-n", namespace, "--duration=1h", *bound).strip()


@pytest.fixture(scope="module")
def operator_kubeconfig(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    for namespace in (NS, OTHER_NS):
        fresh_namespace(kubectl, namespace)
    return harness.operator_kubeconfig(
        k8s, kubectl, tmp_path_factory.mktemp("security"), NS, SYSTEM_NS, LEASE
    )


@pytest.fixture(scope="module")
def served(operator_kubeconfig: Path, kubectl: Kubectl) -> Iterator[dict[str, Any]]:
    """The operator running, an HTTPS LoadBalancer `shop` on the TLS Secret `shop-tls`, and next to it
    Secrets the forwarding pods must not read; yields the forwarding pod (Pending: no kubelet)."""
    folder = operator_kubeconfig.parent
    running = Operator(operator_kubeconfig, folder / "operator.log", NS, LEASE)
    try:
        apply(
            kubectl,
            tls_secret(folder, NS, "shop-tls"),
            tls_secret(folder, NS, "admin-tls"),
            opaque_secret(NS, "db-password"),
            tls_secret(folder, OTHER_NS, "shop-tls"),
            {
                "apiVersion": "layerlb.dev/v1alpha1",
                "kind": "LoadBalancer",
                "metadata": {"name": NAME, "namespace": NS},
                "spec": {
                    "mode": "L7",
                    "architecture": "proxy",
                    "vip": VIP,
                    "listeners": [
                        {
                            "name": "https",
                            "port": 8443,
                            "protocol": "HTTPS",
                            "tls": {"secretName": "shop-tls"},
                        }
                    ],
                    "backends": [{"name": "app", "endpoints": [{"address": "127.0.0.1", "port": 9000}]}],
                    "defaultBackend": "app",
                },
            },
        )

        def pod() -> dict[str, Any] | None:
            listed = json.loads(
                kubectl.ok(
                    "get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=dataplane", "-o", "json"
                )
            )["items"]
            return listed[0] if listed else None

        yield wait_for("the forwarding pod (operator log: see its folder)", pod, timeout=90)
    finally:
        kubectl("delete", "llb", "--all", "-n", NS, "--wait=true", "--timeout=90s")
        running.stop()
        for namespace in (NS, OTHER_NS):
            kubectl("delete", "namespace", namespace, "--wait=false")


def test_a_forwarding_pods_token_reads_its_plan_and_its_tls_secret_and_nothing_else(
    served: dict[str, Any], kubectl: Kubectl, k8s: Cluster
) -> None:
    pod_name, uid = served["metadata"]["name"], served["metadata"]["uid"]
    account = served["spec"]["serviceAccountName"]
    bound = ["--bound-object-kind=Pod", f"--bound-object-name={pod_name}", f"--bound-object-uid={uid}"]
    pod = Identity(k8s, token(kubectl, account, NS, *bound))
    plan, serving, role = f"{NAME}-plan", f"{NAME}-serving", f"{NAME}-dataplane"

    pod.allowed("GET", core(NS, "secrets", "shop-tls"))  # the key of its listener
    pod.allowed("GET", core(NS, "configmaps", plan))
    pod.allowed("PATCH", core(NS, "configmaps", serving), {"data": {pod_name: "1"}})

    pod.refused("GET", core(NS, "secrets", "admin-tls"))  # another TLS Secret of the same namespace
    pod.refused("GET", core(NS, "secrets", "db-password"))
    pod.refused("GET", core(NS, "secrets"))  # a list would show them all
    pod.refused("GET", core(OTHER_NS, "secrets", "shop-tls"))  # the same name elsewhere
    pod.refused("GET", group(LOADBALANCERS, NS, "loadbalancers", NAME))
    pod.refused("PATCH", group(LOADBALANCERS, NS, "loadbalancers", NAME), {"spec": {"replicas": 5}})
    pod.refused(
        "PATCH", group(LOADBALANCERS, NS, "loadbalancers", f"{NAME}/status"), {"status": {"vip": "10.0.0.1"}}
    )
    pod.refused("PATCH", core(NS, "configmaps", plan), {"data": {"plan.json": "{}"}})  # its own Plan
    more = {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]}
    pod.refused("PATCH", group(RBAC, NS, "roles", role), more)  # its own Role
    pod.refused("GET", core(NS, "pods"))
    pod.refused("POST", core(NS, "pods"), SHELL)
    pod.refused("POST", core(NS, "serviceaccounts", f"{account}/token"), {"spec": {"audiences": []}})

    # What the pod reads from its ConfigMap names the Secret; the key itself never leaves it.
    data = json.loads(kubectl.ok("get", "configmap", plan, "-n", NS, "-o", "json"))["data"]
    text = json.dumps(data)
    assert "Secret/shop-tls" in text and "PRIVATE KEY" not in text


def test_the_operator_cannot_do_what_it_does_not_need(
    served: dict[str, Any], operator_kubeconfig: Path, k8s: Cluster, kubectl: Kubectl
) -> None:
    operator = Identity(k8s, yaml.safe_load(operator_kubeconfig.read_text())["users"][0]["user"]["token"])
    roles = group(RBAC, NS, "roles")

    # What it does: a Role granting `get` on a named TLS Secret, which it holds itself.
    named = [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["shop-tls"], "verbs": ["get"]}]
    role = {"apiVersion": RBAC, "kind": "Role", "metadata": {"name": "probe"}, "rules": named}
    operator.allowed("POST", roles, role)

    # What it does not: grant or bind more than it holds (RBAC's escalation check).
    operator.refused(
        "POST", roles, {**role, "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["delete"]}]}
    )
    operator.refused(
        "POST", roles, {**role, "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}
    )
    binding = {
        "apiVersion": RBAC,
        "kind": "RoleBinding",
        "metadata": {"name": "probe"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "layerlb-operator", "namespace": SYSTEM_NS}],
    }
    operator.refused("POST", group(RBAC, NS, "rolebindings"), binding)
    operator.refused("POST", f"/apis/{RBAC}/clusterroles", {**role, "kind": "ClusterRole"})

    # Nor write Secrets, delete what it owns (the garbage collector does), run or exec, or read Nodes.
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "probe"}}
    operator.refused("POST", core(NS, "secrets"), secret)
    operator.refused("PATCH", core(NS, "secrets", "shop-tls"), {"metadata": {"labels": {"a": "b"}}})
    operator.refused("DELETE", core(NS, "secrets", "shop-tls"))
    operator.refused("DELETE", group("apps/v1", NS, "deployments", f"{NAME}-dataplane"))
    operator.refused("DELETE", core(NS, "configmaps", f"{NAME}-plan"))
    operator.refused("POST", core(NS, "pods"), SHELL)
    operator.refused(
        "POST", core(NS, "pods", f"{served['metadata']['name']}/exec") + "?command=true&stdout=true"
    )
    operator.refused("GET", "/api/v1/nodes")
    crd = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/loadbalancers.layerlb.dev"
    operator.refused("PATCH", crd, {"metadata": {"labels": {"a": "b"}}})
    apply(
        kubectl,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "someone-elses", "namespace": NS},
        },
    )
    operator.refused(
        "PATCH",
        group("coordination.k8s.io/v1", NS, "leases", "someone-elses"),
        {"spec": {"holderIdentity": "me"}},
    )


@pytest.mark.parametrize("bgp", [False, True])
def test_the_charts_speaker_reads_a_secret_only_with_bgp_and_only_in_its_namespace(
    bgp: bool, served: dict[str, Any], k8s: Cluster, kubectl: Kubectl
) -> None:
    release = "llb-sec-bgp" if bgp else "llb-sec-l2"
    system = f"{release}-system"
    fresh_namespace(kubectl, system)
    rendered = documents(
        template_release(release, system, *(["--set", "speaker.bgp.enabled=true"] if bgp else []))
    )
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    speaker = [d for d in rendered if d["kind"] in kinds and d["metadata"]["name"].endswith("-speaker")]
    assert {d["kind"] for d in speaker} == (kinds if bgp else kinds - {"Role", "RoleBinding"})
    apply(kubectl, *speaker, opaque_secret(system, "bgp-password"))
    try:
        account = next(d["metadata"]["name"] for d in speaker if d["kind"] == "ServiceAccount")
        identity = Identity(k8s, token(kubectl, account, system))
        if bgp:
            identity.allowed("GET", core(system, "secrets", "bgp-password"))  # a BGPPeer's password, by name
        else:
            identity.refused("GET", core(system, "secrets", "bgp-password"))
        identity.refused("GET", core(system, "secrets"))
        identity.refused("GET", core(NS, "secrets", "shop-tls"))
        # Status it writes; specs it does not.
        identity.allowed("PATCH", group(LOADBALANCERS, NS, "loadbalancers", f"{NAME}/status"), {"status": {}})
        identity.refused("PATCH", group(LOADBALANCERS, NS, "loadbalancers", NAME), {"spec": {"replicas": 5}})
        identity.refused("PATCH", "/api/v1/nodes/any", {"metadata": {"labels": {"a": "b"}}})
        identity.refused("PATCH", core(NS, "services", "any"), {"spec": {}})
        identity.refused("POST", core(NS, "pods"), SHELL)
    finally:
        kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", stdin=yaml.safe_dump_all(speaker))
        kubectl("delete", "namespace", system, "--wait=false")


def template_release(release: str, namespace: str, *args: str) -> str:
    """`helm template` of the chart as release `release` in `namespace` (own names: no clash with others)."""
    done = helm("template", release, str(CHART), "--namespace", namespace, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def has_default_account(kubectl: Kubectl, namespace: str) -> bool:
    return kubectl("get", "serviceaccount", "default", "-n", namespace).returncode == 0


def pod_object(spec: dict[str, Any], namespace: str, name: str) -> dict[str, Any]:
    """A Pod of `spec` under the namespace's default ServiceAccount (the admission of a missing one would
    refuse it first, for another reason than the one under test)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {**spec, "serviceAccountName": "default"},
    }


def test_pod_security_admission_admits_exactly_the_pods_each_level_allows(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None
) -> None:
    levels = {
        "restricted": f"{NS}-restricted",
        "baseline": f"{NS}-baseline",
        "privileged": f"{NS}-privileged",
    }
    for level, namespace in levels.items():
        fresh_namespace(kubectl, namespace)
        kubectl.ok(
            "label", "namespace", namespace, f"pod-security.kubernetes.io/enforce={level}", "--overwrite"
        )
        wait_for(
            f"the default ServiceAccount in {namespace}",
            functools.partial(has_default_account, kubectl, namespace),
        )
    try:
        pods: dict[str, tuple[dict[str, Any], bool]] = {  # name → (pod spec, runs on the host's network)
            "operator": (chart_pod("default", "Deployment"), False),
            "speaker": (chart_pod("default", "DaemonSet"), True),
            "speaker-bgp": (chart_pod("bgp", "DaemonSet"), True),
        }
        for (mode, architecture, port), expected in FORWARDING.items():
            name = f"{mode}-{architecture}-{port}".lower()
            pods[name] = (forwarding_pod(mode, architecture, port), expected.host_network)
        for name, (spec, host) in pods.items():
            for level, namespace in levels.items():
                done = kubectl(
                    "create",
                    "--dry-run=server",
                    "-f",
                    "-",
                    stdin=json.dumps(pod_object(spec, namespace, name)),
                )
                admitted = level == "privileged" or not host
                if admitted:
                    assert done.returncode == 0, f"{name} refused at {level}: {done.stderr}"
                else:
                    assert done.returncode != 0 and "violates PodSecurity" in done.stderr, (
                        f"{name} at {level}"
                    )
                    assert "hostNetwork=true" in done.stderr, done.stderr
    finally:
        for namespace in levels.values():
            kubectl("delete", "namespace", namespace, "--wait=false")

"""The Helm chart on a cluster with real nodes: install, the operator running as the chart's pods, upgrade,
uninstall.

The install and upgrade commands are the README's own, against a local cluster of two real nodes
(`e2e/nodes/platform.local_nodes`: kubelets, containerd, the project's image under the names the chart
pulls). The chart's operator runs as real pods with the chart's securityContext and ServiceAccount, so
the chart's RBAC is what lets it work: after the upgrade to `operator.watchNamespaces`, its narrowest form
(the namespaced rules bound in the watched namespace only, the cluster-wide install grants the same rules
everywhere). The kubelets run the forwarding pods of the watched namespace, so the LoadBalancer of the
install notes goes all the way to Ready, waited for as the notes say. The GitOps behaviour is checked on the way: unchanged applies cause no writes, the operator owns no
field of a spec, and `kubectl wait` and the Argo CD health check read the status. The tests of this
module run in order, each building on the previous one.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import yaml

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.kube import ROOT, Kubectl
from e2e.nodes import pods
from e2e.nodes.chart_operator import ChartOperator
from e2e.nodes.platform import LocalNodes, chart_default_image, local_nodes

RELEASE, RELEASE_NS = "layerlb", "layerlb-system"  # as in the README
NS = "llb-helm"  # the namespace the test's LoadBalancers live in, and the operator watches
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
CHART_KINDS = "deployment,serviceaccount,service,poddisruptionbudget,role,rolebinding,lease,configmap,secret"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
    """`harness.wait_for` with this module's longer default (helm and the chart's operator are slower)."""
    return harness.wait_for(what, probe, timeout)


class Helm:
    """`helm` from the local build (on the cluster env's PATH), run from the repository root."""

    def __init__(self, cluster: Cluster) -> None:
        self.env = cluster.env()

    def __call__(self, *argv: str) -> str:
        done = subprocess.run(
            list(argv), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout


def get(kubectl: Kubectl, kind: str, name: str, namespace: str | None = NS) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", "--show-managed-fields"] + (
        ["-n", namespace] if namespace else []
    )
    done = kubectl(*args)
    return json.loads(done.stdout) if done.returncode == 0 else None


def labelled(kubectl: Kubectl, kinds: str, selector: str, namespace: str | None) -> list[str]:
    where = ["-n", namespace] if namespace else []
    listed = json.loads(kubectl.ok("get", kinds, *where, "-l", selector, "-o", "json"))
    return [f"{o['kind']}/{o['metadata']['name']}" for o in listed["items"]]


def condition(kubectl: Kubectl, name: str, kind: str) -> dict[str, Any]:
    conditions = ((get(kubectl, "llb", name) or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def wait_condition(kubectl: Kubectl, name: str, kind: str, status: str, reason: str | None = None) -> None:
    wait_for(
        f"{name}: {kind}={status} {reason or ''}",
        lambda: (
            (c := condition(kubectl, name, kind)).get("status") == status
            and (reason is None or c.get("reason") == reason)
        ),
    )


def ssa(kubectl: Kubectl, manager: str, *documents: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Server-side apply as a GitOps tool does it: its own field manager, no forcing."""
    return kubectl(
        "apply", "--server-side", f"--field-manager={manager}", "-f", "-", stdin=yaml.safe_dump_all(documents)
    )


def owned_versions(kubectl: Kubectl, name: str) -> dict[str, str]:
    """resourceVersion of LoadBalancer `name` and of every object the operator made for it."""
    listed = json.loads(
        kubectl.ok("get", "configmap,deployment,serviceaccount,role,rolebinding", "-n", NS,
                   "-l", f"layerlb.dev/loadbalancer={name}", "-o", "json")
    )  # fmt: skip
    found = {
        f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in listed["items"]
    }
    found["LoadBalancer"] = (get(kubectl, "llb", name) or {})["metadata"]["resourceVersion"]
    return found


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNodes]:
    """Two real nodes for this module, the project's image also under the dataplane tag the upgrade sets."""
    repository = chart_default_image().rsplit(":", 1)[0]
    with local_nodes(
        tmp_path_factory.mktemp("helm") / "cluster", NS, tags=[f"{repository}:0.1.0-e2e"]
    ) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def k8s(local: LocalNodes) -> Cluster:
    return local.cluster


@pytest.fixture(scope="module")
def kubectl(k8s: Cluster) -> Kubectl:
    return Kubectl(k8s)


@pytest.fixture(scope="module")
def helm(k8s: Cluster) -> Helm:
    return Helm(k8s)


@pytest.fixture(scope="module")
def installed(helm: Helm, kubectl: Kubectl) -> Iterator[str]:
    """The chart installed by the README's command; yields the install notes. Uninstalls at the end if a
    test failed before the uninstall test did."""

    def gone_or_active() -> bool:  # a namespace left terminating by an earlier run must be gone first
        phases = [
            (get(kubectl, "namespace", n, None) or {}).get("status", {}).get("phase")
            for n in (RELEASE_NS, NS)
        ]
        return "Terminating" not in phases

    wait_for(f"namespaces {RELEASE_NS} and {NS} to finish terminating", gone_or_active, timeout=120)
    kubectl.ok("apply", "-f", "-", stdin=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n")
    notes = helm(*harness.readme_command("install"))
    yield notes
    if (
        subprocess.run(
            ["helm", "status", RELEASE, "-n", RELEASE_NS], env=helm.env, capture_output=True
        ).returncode
        == 0
    ):
        kubectl("delete", "llb", "--all", "-n", NS, "--timeout=60s")
        helm("helm", "uninstall", RELEASE, "--namespace", RELEASE_NS)
    kubectl("delete", "namespace", NS, RELEASE_NS, "--wait=false")
    kubectl("delete", "vippool", "default", "--ignore-not-found")


def test_install_creates_the_operator_its_rbac_and_the_crds(installed: str, kubectl: Kubectl) -> None:
    kubectl.ok("wait", "--for=condition=Established", "--timeout=120s",
               "crd/loadbalancers.layerlb.dev", "crd/vippools.layerlb.dev")  # fmt: skip
    found = set(labelled(kubectl, CHART_KINDS, INSTANCE, RELEASE_NS))
    assert {
        "Deployment/layerlb", "ServiceAccount/layerlb", "Service/layerlb-metrics", "PodDisruptionBudget/layerlb",
        "Role/layerlb-leader-election", "RoleBinding/layerlb-leader-election", "Lease/layerlb-operator",
    } <= found, found  # fmt: skip
    assert labelled(kubectl, "clusterrole,clusterrolebinding", INSTANCE, None) == [
        "ClusterRole/layerlb",
        "ClusterRole/layerlb-speaker",  # the L2 speaker DaemonSet's read-mostly rules
        "ClusterRoleBinding/layerlb",
        "ClusterRoleBinding/layerlb-speaker",
    ]
    assert {"DaemonSet/layerlb-speaker", "ServiceAccount/layerlb-speaker"} <= set(
        labelled(kubectl, "daemonset,serviceaccount", INSTANCE, RELEASE_NS)
    )
    assert "kubectl apply -f - <<'YAML'" in installed and "kind: LoadBalancer" in installed


def test_kubectl_explain_describes_each_architecture(installed: str, kubectl: Kubectl) -> None:
    def explained() -> str | None:
        done = kubectl("explain", "loadbalancer.spec.architecture")
        return " ".join(done.stdout.split()) if done.returncode == 0 else None

    text = wait_for("the CRD's schema in the API server's OpenAPI", explained)
    for meaning in (
        "L4 nat: the kernel",
        "L4 dsr:",
        "L4 tunnel:",
        "L4 proxy:",
        "L7 proxy:",
        "L7 transparent:",
    ):
        assert meaning in text, text
    fields = " ".join(kubectl.ok("explain", "loadbalancer.status.conditions").split())
    assert "observedGeneration" in fields and "The generation this condition describes" in fields


def test_upgrade_with_changed_values_updates_and_removes_what_the_values_say(
    installed: str, helm: Helm, kubectl: Kubectl
) -> None:
    helm(*harness.readme_command("upgrade", "replicaCount"))
    assert (get(kubectl, "deployment", "layerlb", RELEASE_NS) or {})["spec"]["replicas"] == 2
    helm("helm", "upgrade", RELEASE, "charts/layerlb", "--namespace", RELEASE_NS, "--reuse-values",
         "--set", f"operator.watchNamespaces={{{NS}}}", "--set", "podDisruptionBudget.enabled=false",
         "--set", "metrics.service.enabled=false", "--set", "dataplane.image.tag=0.1.0-e2e")  # fmt: skip
    found = set(labelled(kubectl, CHART_KINDS, INSTANCE, RELEASE_NS))
    assert not {"Service/layerlb-metrics", "PodDisruptionBudget/layerlb"} & found, found
    # Watching one namespace: the namespaced permissions move from a cluster-wide binding to that namespace.
    assert sorted(labelled(kubectl, "clusterrole,clusterrolebinding", INSTANCE, None)) == [
        "ClusterRole/layerlb", "ClusterRole/layerlb-cluster", "ClusterRole/layerlb-speaker",
        "ClusterRoleBinding/layerlb-cluster", "ClusterRoleBinding/layerlb-speaker",
    ]  # fmt: skip
    assert labelled(kubectl, "rolebinding", INSTANCE, NS) == ["RoleBinding/layerlb"]
    deployment = get(kubectl, "deployment", "layerlb", RELEASE_NS) or {}
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert deployment["spec"]["replicas"] == 2
    args = container["args"]
    assert args[args.index("--namespace") : args.index("--namespace") + 2] == ["--namespace", NS]
    assert args.count("--namespace") == 1  # the values' other namespace is gone
    assert {"name": "LAYERLB_DATAPLANE_IMAGE", "value": "ghcr.io/layerlb/layerlb:0.1.0-e2e"} in container[
        "env"
    ]


@pytest.fixture(scope="module")
def operator(
    installed: str, k8s: Cluster, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> ChartOperator:
    """The installed operator's pods, rolled out and leading; first, what the chart's ServiceAccount (which
    they run as) may and may not do, asked with a token of it (TokenRequest)."""
    deployment = get(kubectl, "deployment", "layerlb", RELEASE_NS)
    assert deployment
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = kubectl.ok("create", "token", account, "-n", RELEASE_NS, "--duration=2h").strip()  # TokenRequest
    admin = yaml.safe_load(k8s.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "chart", "context": {"cluster": "e2e", "user": account}}],
        "current-context": "chart",
    }
    folder = tmp_path_factory.mktemp("helm-operator")
    kubeconfig = folder / "chart-sa.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    whoami = json.loads(kubectl.ok("--kubeconfig", str(kubeconfig), "auth", "whoami", "-o", "json"))
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{RELEASE_NS}:{account}"

    def can(verb: str, resource: str, *where: str) -> str:
        return kubectl(
            "--kubeconfig", str(kubeconfig), "auth", "can-i", verb, resource, *where
        ).stdout.strip()

    for verb, resource in [
        ("delete", "loadbalancers"),
        ("create", "clusterroles"),
        ("get", "secrets"),
        ("*", "*"),
    ]:
        assert can(verb, resource, "-A") == "no", (verb, resource)
    assert (can("list", "services", "-n", NS), can("list", "services", "-n", "default")) == ("yes", "no")
    assert can("watch", "vippools") == "yes"
    kubectl.ok("rollout", "status", "deployment/layerlb", "-n", RELEASE_NS, "--timeout=180s")
    operator_pods = f"{INSTANCE},app.kubernetes.io/component=operator"
    pods.wait_ready(kubectl.env, RELEASE_NS, operator_pods, count=deployment["spec"]["replicas"], timeout=180)
    running = ChartOperator(kubectl)
    wait_for(
        "the operator to lead", lambda: running.metrics().get("layerlb_operator_leader") == 1, timeout=90
    )
    return running


def notes_manifests(notes: str) -> list[dict[str, Any]]:
    """The manifests of the install notes (their `kubectl apply` heredocs), moved into the test namespace."""
    blocks = re.findall(r"kubectl apply -f - <<'YAML'\n(.*?)\n\s*YAML\n", notes, flags=re.S)
    documents = [yaml.safe_load(textwrap.dedent(block)) for block in blocks]
    for document in documents:
        if "namespace" in document["metadata"]:
            document["metadata"]["namespace"] = NS
    return documents


def web_service() -> list[dict[str, Any]]:
    """The Service `web` of the notes' example, with one ready endpoint (no pods run here)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.2.0.1"], "conditions": {"ready": True}}],
        },
    ]


def test_the_notes_load_balancer_is_ready_by_the_operator_on_the_chart_rbac(
    installed: str, operator: ChartOperator, kubectl: Kubectl
) -> None:
    pool, load_balancer = notes_manifests(installed)
    assert (pool["kind"], load_balancer["kind"]) == ("VIPPool", "LoadBalancer")
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(web_service()))
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(pool))
    assert ssa(kubectl, "gitops", load_balancer).returncode == 0
    wait_condition(kubectl, "web", "Accepted", "True", "Valid")
    wait_condition(kubectl, "web", "Programmed", "True")
    web = get(kubectl, "llb", "web") or {}
    assert web["status"]["vip"].startswith("192.0.2.2")
    assert web["status"]["observedGeneration"] == web["metadata"]["generation"]
    deployment = get(kubectl, "deployment", "web-dataplane") or {}
    assert (
        deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        == "ghcr.io/layerlb/layerlb:0.1.0-e2e"
    )
    from tests.test_chart_argocd import health  # the health check of docs/argocd.md, on the live object

    if condition(kubectl, "web", "Ready").get("status") != "True":
        assert health(web)[0] == "Progressing"
    # As the notes say (in the test's namespace): the forwarding pod starts and serves this generation.
    [wait] = re.findall(r"^\s*kubectl (wait .*)$", installed, flags=re.M)
    kubectl.ok(*shlex.split(wait), "-n", NS)
    web = get(kubectl, "llb", "web") or {}
    assert condition(kubectl, "web", "Ready")["reason"] == "Serving"
    # Ready includes the speakers' announcement (the chart runs them): "...; VIP announced".
    state, message = health(web)
    assert state == "Healthy", message
    assert message.startswith(f"1/1 forwarding pods serve generation {web['metadata']['generation']}; "), (
        message
    )
    assert message.endswith(" announced"), message
    logs = operator.logs()
    assert "ApplyFailed" not in logs and "Forbidden" not in logs, operator.tail()


def test_applying_unchanged_writes_nothing(operator: ChartOperator, kubectl: Kubectl, installed: str) -> None:
    _, load_balancer = notes_manifests(installed)
    web = owned_versions(kubectl, "web")
    assert len(web) >= 6, web  # the LoadBalancer and at least its five objects
    assert ssa(kubectl, "gitops", load_balancer).returncode == 0  # a sync with server-side apply
    # Another LoadBalancer, applied client-side (Argo CD's default), twice. Once it is Ready the operator
    # has been at work after the unchanged apply of `web`.
    barrier = {**load_balancer, "metadata": {"name": "barrier", "namespace": NS}}
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(barrier))
    wait_condition(kubectl, "barrier", "Ready", "True")  # its pod has started and reported: all settled
    assert owned_versions(kubectl, "web") == web
    barrier_versions = owned_versions(kubectl, "barrier")
    # kubectl sends a patch (a CRD's lists are replaced whole, and the API server defaults items), which
    # the API server finds changes nothing: no new resourceVersion, no event, nothing for the operator.
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(barrier))
    assert ssa(kubectl, "gitops", load_balancer).returncode == 0
    later = {**load_balancer, "metadata": {"name": "later", "namespace": NS}}
    assert ssa(kubectl, "gitops", later).returncode == 0
    wait_condition(kubectl, "later", "Programmed", "True")
    assert owned_versions(kubectl, "web") == web
    assert owned_versions(kubectl, "barrier") == barrier_versions


def test_the_operator_owns_no_spec_field_and_keeps_fields_others_own(
    operator: ChartOperator, kubectl: Kubectl, installed: str
) -> None:
    _, load_balancer = notes_manifests(installed)
    web = wait_for(
        "the speaker holding web's VIP to write status.announcement",
        lambda: (
            found
            if ((found := get(kubectl, "llb", "web") or {}).get("status") or {}).get("announcement")
            else None
        ),
    )
    spec_owners = {
        e["manager"] for e in web["metadata"]["managedFields"] if "f:spec" in e.get("fieldsV1", {})
    }
    assert spec_owners == {"gitops"}, spec_owners
    status_owners = {
        e["manager"] for e in web["metadata"]["managedFields"] if e.get("subresource") == "status"
    }
    # The operator writes the status; the speaker holding the VIP writes only `status.announcement`.
    assert status_owners == {"layerlb-operator", "layerlb-speaker"}, status_owners
    speaker = next(e for e in web["metadata"]["managedFields"] if e["manager"] == "layerlb-speaker")
    assert set(speaker["fieldsV1"]["f:status"]) == {"f:announcement"}, speaker

    # Someone else's annotation on the operator's Deployment survives the operator's next apply.
    kubectl.ok("annotate", "deployment", "web-dataplane", "-n", NS, "example.com/owner=team-a")
    changed = {**load_balancer, "spec": {**load_balancer["spec"], "replicas": 2}}
    applied = ssa(kubectl, "gitops", changed)
    assert applied.returncode == 0, applied.stderr  # no conflict: nobody else owns spec.replicas
    generation = (get(kubectl, "llb", "web") or {})["metadata"]["generation"]
    # `kubectl wait` reads the conditions' observedGeneration: it returns once generation `generation` is done.
    kubectl.ok("wait", "--for=condition=Programmed", "--timeout=60s", "-n", NS, "llb/web")
    kubectl.ok(
        "wait",
        f"--for=jsonpath={{.status.observedGeneration}}={generation}",
        "--timeout=60s",
        "-n",
        NS,
        "llb/web",
    )
    web = get(kubectl, "llb", "web") or {}
    assert condition(kubectl, "web", "Programmed")["observedGeneration"] == generation
    deployment = get(kubectl, "deployment", "web-dataplane") or {}
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["annotations"]["example.com/owner"] == "team-a"


def test_a_refused_load_balancer_is_degraded_for_argo_cd(
    operator: ChartOperator, kubectl: Kubectl, installed: str
) -> None:
    from tests.test_chart_argocd import health

    _, load_balancer = notes_manifests(installed)
    taken = (get(kubectl, "llb", "web") or {})["status"]["vip"]
    copy = {
        **load_balancer,
        "metadata": {"name": "copy", "namespace": NS},
        "spec": {**load_balancer["spec"], "vip": taken},
    }
    assert ssa(kubectl, "gitops", copy).returncode == 0
    wait_condition(kubectl, "copy", "Accepted", "False", "VIPConflict")
    status, message = health(get(kubectl, "llb", "copy") or {})
    assert status == "Degraded" and "VIPConflict" in message and taken in message


def test_an_upgrade_leaves_the_leaders_lease_alone(
    operator: ChartOperator, helm: Helm, kubectl: Kubectl
) -> None:
    """The chart owns the Lease (so uninstall removes it) but sets no spec: an upgrade must not reset it."""
    holder = (get(kubectl, "lease", "layerlb-operator", RELEASE_NS) or {})["spec"]["holderIdentity"]
    assert holder
    helm("helm", "upgrade", RELEASE, "charts/layerlb", "--namespace", RELEASE_NS, "--reuse-values",
         "--set", "replicaCount=3")  # fmt: skip
    assert (get(kubectl, "deployment", "layerlb", RELEASE_NS) or {})["spec"]["replicas"] == 3
    lease = get(kubectl, "lease", "layerlb-operator", RELEASE_NS) or {}
    assert lease["spec"]["holderIdentity"] == holder
    assert lease["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert operator.metrics().get("layerlb_operator_leader") == 1


def test_uninstall_leaves_no_orphans_but_keeps_the_crds(
    operator: ChartOperator, helm: Helm, kubectl: Kubectl, installed: str
) -> None:
    kubectl.ok("delete", "llb", "--all", "-n", NS, "--wait=true", "--timeout=60s")  # while the operator runs
    wait_for(
        "the garbage collector to remove the LoadBalancers' objects",
        lambda: (
            not labelled(
                kubectl,
                "configmap,deployment,serviceaccount,role,rolebinding,replicaset,pod",
                "layerlb.dev/loadbalancer",  # the operator's objects (the chart's RoleBinding is here too)
                NS,
            )
        ),
    )
    assert "Traceback" not in operator.logs(), operator.tail()
    helm("helm", "uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait")
    wait_for(
        "every object of the release to be gone",
        lambda: (
            not labelled(kubectl, f"{CHART_KINDS},replicaset,pod", INSTANCE, RELEASE_NS)
            and not labelled(kubectl, "rolebinding", INSTANCE, NS)
            and not labelled(kubectl, "clusterrole,clusterrolebinding", INSTANCE, None)
        ),
    )
    assert not labelled(kubectl, "secret", f"owner=helm,name={RELEASE}", RELEASE_NS)  # Helm's release records
    for crd in ("loadbalancers.layerlb.dev", "vippools.layerlb.dev"):
        assert get(kubectl, "crd", crd, None), f"{crd} was removed; Helm keeps CRDs"

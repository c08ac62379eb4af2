"""The Helm chart: lints, renders the reviewed manifests, grants exactly the operator's RBAC, refuses bad values.

Golden files: `helm template` of the default values renders to `testdata/chart/default.yaml`, and each
`charts/layerlb/ci/NAME-values.yaml` to `testdata/chart/NAME.yaml`; `pytest --update-goldens` rewrites
them. The installed behaviour (install, upgrade, uninstall, the operator on the chart's own
ServiceAccount) is in e2e/test_helm.py.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from layerlb_operator import rbac

from e2e.cluster.cluster import BUILD_SCRIPT, default_bin_dir

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "layerlb"
GOLDENS = ROOT / "testdata" / "chart"
VARIANTS = {
    "default": None,
    **{p.name.removesuffix("-values.yaml"): p for p in (CHART / "ci").glob("*-values.yaml")},
}
RELEASE, NAMESPACE = "layerlb", "layerlb-system"


def helm_binary() -> str:
    """helm from the local cluster's Go-module build (e2e/cluster/build.sh), built on first use."""
    helm = default_bin_dir() / "helm"
    if not os.access(helm, os.X_OK):
        subprocess.run(["bash", str(BUILD_SCRIPT)], stdin=subprocess.DEVNULL, check=False)
    assert os.access(helm, os.X_OK), f"{helm} missing: e2e/cluster/build.sh could not build helm"
    return str(helm)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False)


def template(*args: str) -> str:
    done = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _sync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_sync", ROOT / "charts" / "sync.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_crds_and_rules_are_current_with_their_sources() -> None:
    """crds/ (from the models) and rbac.py are the single sources; `make chart` copies them in."""
    assert _sync().stale() == [], "the chart is stale; run `make chart`"
    for source in sorted((ROOT / "crds").glob("*.yaml")):
        assert (CHART / "crds" / source.name).read_bytes() == source.read_bytes(), source.name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_is_clean(variant: str) -> None:
    values = VARIANTS[variant]
    done = helm("lint", "--strict", str(CHART), *(["--values", str(values)] if values else []))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_golden_template(variant: str, request: pytest.FixtureRequest) -> None:
    values = VARIANTS[variant]
    actual = template(*(["--values", str(values)] if values else []))
    golden = GOLDENS / f"{variant}.yaml"
    if request.config.getoption("--update-goldens"):
        GOLDENS.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
    assert golden.exists(), f"{golden.name} missing; run pytest tests/test_chart.py --update-goldens"
    expected = golden.read_text(encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True), str(golden), "helm template"
        )
    )
    assert not diff, f"helm template differs from {golden.name} (pytest --update-goldens to accept):\n{diff}"


def _grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str, tuple[str, ...]], set[str]]:
    """(API group, resource, resourceNames) → verbs, whatever way the rules group them."""
    grants: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    for rule in rules:
        names = tuple(sorted(rule.get("resourceNames") or ()))
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource, names), set()).update(rule["verbs"])
    return grants


def _account(rendered: list[dict[str, Any]]) -> dict[str, str]:
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    name = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    return {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}


def _speakers(d: dict[str, Any]) -> bool:
    return bool(d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "speaker")


def _named(rendered: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The operator's objects of `kind` by name (the speaker's have tests of their own)."""
    return {d["metadata"]["name"]: d for d in rendered if d["kind"] == kind and not _speakers(d)}


def test_rbac_grants_exactly_the_verbs_the_operator_declares_cluster_wide() -> None:
    rendered = documents(template())
    [cluster_role] = _named(rendered, "ClusterRole").values()
    [lease_role] = _named(rendered, "Role").values()
    assert _grants(cluster_role["rules"]) == _grants(rbac.cluster_rules())
    assert _grants(lease_role["rules"]) == _grants(rbac.lease_rules("layerlb-operator"))
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    for rule in cluster_role["rules"] + lease_role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    [binding] = _named(rendered, "ClusterRoleBinding").values()
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    [lease_binding] = _named(rendered, "RoleBinding").values()
    assert lease_binding["roleRef"]["name"] == lease_role["metadata"]["name"]
    for each in (binding, lease_binding):
        assert each["subjects"] == [_account(rendered)]


def test_rbac_of_a_namespaced_install_binds_namespaced_rules_in_the_watched_namespaces_only() -> None:
    rendered = documents(template("--values", str(VARIANTS["namespaced"])))
    roles = _named(rendered, "ClusterRole")
    namespaced, cluster_scoped = roles["lb-operator"], roles["lb-operator-cluster"]
    assert _grants(namespaced["rules"]) | _grants(cluster_scoped["rules"]) == _grants(rbac.cluster_rules())
    assert not _grants(namespaced["rules"]).keys() & _grants(cluster_scoped["rules"]).keys()
    assert {resource for _, resource, _ in _grants(cluster_scoped["rules"])} == {
        "vippools",
        "vippools/status",
        "bgppeers",
        "bgppeers/status",
        "bgpadvertisements",
    }
    [binding] = _named(rendered, "ClusterRoleBinding").values()
    assert binding["roleRef"]["name"] == "lb-operator-cluster"
    bindings = [d for d in rendered if d["kind"] == "RoleBinding"]
    per_namespace = {b["metadata"]["namespace"]: b["roleRef"]["name"] for b in bindings}
    assert per_namespace == {
        "shop": "lb-operator",
        "payments": "lb-operator",
        NAMESPACE: "lb-operator-leader-election",
    }
    [lease_role] = _named(rendered, "Role").values()
    assert _grants(lease_role["rules"]) == _grants(rbac.lease_rules("lb-leader"))
    for each in [binding, *bindings]:
        assert each["subjects"] == [_account(rendered)]


def test_every_resource_the_operator_uses_has_a_known_scope() -> None:
    """A permission added to rbac.py must be sorted into cluster-scoped or namespaced by charts/sync.py."""
    sync = _sync()
    for rule in rbac.cluster_rules() + rbac.lease_rules("x"):
        assert sync.scope(rule) in ("cluster", "namespaced")
    with pytest.raises(ValueError, match="say whether core/nodes is cluster-scoped"):
        sync.scope({"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]})


def test_the_deployment_runs_the_operator_with_the_chart_settings() -> None:
    rendered = documents(template("--values", str(VARIANTS["namespaced"])))
    [deployment] = [d for d in rendered if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [
        "operator", "--peering", "lb-leader", "--metrics", "0.0.0.0:8080",
        "--namespace", "shop", "--namespace", "payments", "--verbose", "--vips-outside-pools", "refuse",
        "--ready-needs-announcement",
    ]  # fmt: skip
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LAYERLB_DATAPLANE_IMAGE"] == "registry.example.com/layerlb/layerlb-dataplane:0.1.0"
    # The downward API names the Lease holder (and kopf): runAsUser has no passwd entry to name it by.
    fields = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e
    }
    assert fields == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert container["image"] == "registry.example.com/layerlb/layerlb:0.1.0-rc1"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "platform-lb"
    kinds = {d["kind"] for d in rendered if not _speakers(d)}
    assert not kinds & {"ServiceAccount", "Service", "PodDisruptionBudget", "ServiceMonitor"}, kinds


def test_ready_waits_for_the_announcement_only_where_the_chart_runs_speakers() -> None:
    def args(*extra: str) -> list[str]:
        [deployment] = [d for d in documents(template(*extra)) if d["kind"] == "Deployment"]
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    assert "--ready-needs-announcement" in args()
    assert "--ready-needs-announcement" not in args("--set", "speaker.enabled=false")


def test_the_charts_operator_refuses_a_vip_outside_every_pool_unless_told_to_allow_it() -> None:
    """The chart runs the speakers, which announce every VIP on the nodes' LAN: by default a spec.vip must
    come from a VIPPool (docs/security.md); `allow` is the bare binary's default and must be asked for."""

    def args(*extra: str) -> list[str]:
        [deployment] = [d for d in documents(template(*extra)) if d["kind"] == "Deployment"]
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    def setting(found: list[str]) -> str:
        return found[found.index("--vips-outside-pools") + 1]

    assert setting(args()) == "refuse"
    assert setting(args("--set", "operator.vipsOutsidePools=allow")) == "allow"
    done = helm("template", RELEASE, str(CHART), "--set", "operator.vipsOutsidePools=yes")
    assert done.returncode != 0 and "at '/operator/vipsOutsidePools'" in done.stderr, done.stderr


def test_the_dataplane_image_defaults_to_the_operator_image() -> None:
    rendered = documents(template("--set", "image.tag=1.2.3"))
    [deployment] = [d for d in rendered if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == env["LAYERLB_DATAPLANE_IMAGE"] == "ghcr.io/layerlb/layerlb:1.2.3"


def test_classless_services_are_served_only_when_the_value_says_so() -> None:
    def args(*extra: str) -> list[str]:
        [deployment] = [d for d in documents(template(*extra)) if d["kind"] == "Deployment"]
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        return list(container["args"])

    assert "--serve-classless-services" not in args()
    assert "--serve-classless-services" in args("--set", "services.serveClassless=true")
    done = helm("template", RELEASE, str(CHART), "--set", "services.serveClassless=yes")
    assert done.returncode != 0 and "at '/services/serveClassless'" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("replicaCount=two", "at '/replicaCount': got string, want integer"),
        ("replicaCount=0", "at '/replicaCount': minimum: got 0, want 1"),
        (
            "image.pullPolicy=Sometimes",
            "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
        ),
        ("replicas=2", "additional properties 'replicas' not allowed"),
        ("metrics.port=70000", "at '/metrics/port': maximum: got 70,000, want 65,535"),
        (
            "operator.leaseName=Leader_Lease",
            "at '/operator/leaseName': 'Leader_Lease' does not match pattern",
        ),
        ("podDisruptionBudget.maxUnavailable=half", "at '/podDisruptionBudget/maxUnavailable'"),
        ("metrics.serviceMonitor.interval=often", "at '/metrics/serviceMonitor/interval'"),
        (
            "dataplane.hostAdminPorts=90-100",
            "at '/dataplane/hostAdminPorts': '90-100' does not match pattern",
        ),
        ("serviceAccount.create=false", "serviceAccount.name: name an existing ServiceAccount"),
        (
            "metrics.serviceMonitor.enabled=true,metrics.service.enabled=false",
            "metrics.serviceMonitor.enabled needs metrics.service.enabled",
        ),
    ],
)
def test_bad_values_are_refused_with_the_path_and_the_reason(setting: str, message: str) -> None:
    done = helm("template", RELEASE, str(CHART), "--set", setting)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "panic" not in done.stderr and "goroutine" not in done.stderr


def test_the_speaker_runs_on_every_node_on_the_host_network_with_net_raw_only() -> None:
    rendered = [d for d in documents(template()) if _speakers(d)]
    [daemonset] = [d for d in rendered if d["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["hostNetwork"] is True and "tolerations" not in pod
    assert container["args"][:1] == ["speaker"]
    assert container["env"] == [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    ]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW"]}
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert pod["serviceAccountName"] == daemonset["metadata"]["name"]


def test_the_speakers_rbac_reads_what_it_announces_from_and_writes_events_and_status_only() -> None:
    rendered = [d for d in documents(template()) if _speakers(d)]
    [role] = [d for d in rendered if d["kind"] == "ClusterRole"]
    grants = _grants(role["rules"])
    writes = {key: verbs - {"get", "list", "watch"} for key, verbs in grants.items()}
    assert {key: verbs for key, verbs in writes.items() if verbs} == {
        ("", "events", ()): {"create", "patch"},
        ("layerlb.dev", "loadbalancers/status", ()): {"patch"},  # status.announcement
        ("", "services/status", ()): {"patch"},  # the layerlb.dev/AnnouncedIPv4|6 conditions
        ("layerlb.dev", "vippools/status", ()): {"patch"},  # its node's entry of status.nodes
        ("layerlb.dev", "bgppeers/status", ()): {"patch"},  # its node's BGP session in status.nodes
    }
    assert grants[("layerlb.dev", "loadbalancers/status", ())] == {"patch"}  # no get, no update
    assert grants[("", "services/status", ())] == {"patch"}
    assert grants[("layerlb.dev", "vippools/status", ())] == {"patch"}
    assert grants[("layerlb.dev", "bgppeers/status", ())] == {"patch"}
    for kind in ("bgppeers", "bgpadvertisements"):
        assert grants[("layerlb.dev", kind, ())] == {"get", "list", "watch"}
    assert {resource for _, resource, _ in grants} == {
        "nodes", "pods", "services", "endpointslices", "loadbalancers", "vippools", "events",
        "loadbalancers/status", "services/status", "vippools/status",
        "bgppeers", "bgpadvertisements", "bgppeers/status",
    }  # fmt: skip
    [binding] = [d for d in rendered if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": role["metadata"]["name"], "namespace": NAMESPACE}
    ]


def test_the_speaker_takes_its_settings_and_can_be_switched_off() -> None:
    rendered = documents(
        template("--set", "speaker.interfaces={eth1,eth2}", "--set", "services.serveClassless=true")
    )
    [daemonset] = [d for d in rendered if d["kind"] == "DaemonSet"]
    args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [
        "speaker", "--port", "7947", "--heartbeat-interval", "0.1", "--dead-after", "0.5",
        "--max-dead-after", "2", "--interface", "eth1", "--interface", "eth2", "--classless-services",
    ]  # fmt: skip
    assert not [d for d in documents(template("--set", "speaker.enabled=false")) if _speakers(d)]


def test_bgp_adds_bind_service_a_runtime_dir_and_secrets_of_the_release_namespace_only() -> None:
    plain = [d for d in documents(template()) if _speakers(d)]
    assert not [d for d in plain if d["kind"] in ("Role", "RoleBinding")]
    rendered = [d for d in documents(template("--set", "speaker.bgp.enabled=true")) if _speakers(d)]
    [daemonset] = [d for d in rendered if d["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"][-3:] == ["--bgp", "--bgp-dir", "/run/layerlb-speaker/bgp"]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in (
        container["env"]
    )
    assert container["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_RAW", "NET_BIND_SERVICE"],
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["volumeMounts"] == [{"name": "run", "mountPath": "/run/layerlb-speaker"}]
    assert pod["volumes"][0]["name"] == "run" and "emptyDir" in pod["volumes"][0]
    assert pod["terminationGracePeriodSeconds"] == 15  # the graceful withdraw before exit fits with room
    [role] = [d for d in rendered if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    [binding] = [d for d in rendered if d["kind"] == "RoleBinding"]
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": daemonset["metadata"]["name"], "namespace": NAMESPACE}
    ]
    # No ClusterRole rule reads Secrets: only the namespaced Role does.
    [cluster_role] = [d for d in rendered if d["kind"] == "ClusterRole"]
    assert not [rule for rule in cluster_role["rules"] if "secrets" in rule["resources"]]

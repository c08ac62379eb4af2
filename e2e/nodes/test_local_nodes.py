"""The local cluster's nodes behave as a real cluster's: what every other real-node test stands on.

Local platform only (kind is a real cluster already): nodes registered and Ready, pods scheduled over
them and Ready within seconds with the chart's kind of securityContext enforced, Services across nodes
through kube-proxy, the API server reachable from pods, `kubectl logs` and `exec` through the kubelet,
a pod spec the kubelet refuses reported with its own events, and the chart's operator running as the
chart says.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import pytest

from e2e import harness
from e2e.nodes import pods
from e2e.nodes.chart_operator import OPERATOR_PODS as OPERATOR
from e2e.nodes.chart_operator import RELEASE_NS as RELEASE_NAMESPACE
from e2e.nodes.conftest import LOCAL_NODES
from e2e.nodes.platform import LocalNodes, Platform, PlatformError

NAMESPACE = "llb-node-checks"
BACKEND = "localhost/backend:dev"


@pytest.fixture(scope="module")
def local(platform: Platform) -> LocalNodes:
    assert isinstance(platform, LocalNodes)
    pods.kubectl(platform.env, "create", "namespace", NAMESPACE)
    return platform


def kubectl(local: LocalNodes, *args: str, stdin: str | None = None) -> str:
    return pods.kubectl(local.env, *args, stdin=stdin)


def web_deployment(replicas: int) -> dict[str, Any]:
    """busybox httpd pods answering their own name, non-root, read-only root, seccomp, no capabilities."""
    script = "echo $HOSTNAME > /tmp/index.html && exec httpd -f -p 8080 -h /tmp"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # Spread over the nodes, so Services are proved across them.
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "DoNotSchedule",
                            "labelSelector": {"matchLabels": {"app": "web"}},
                        }
                    ],
                    "containers": [
                        {
                            "name": "web",
                            "image": BACKEND,
                            "imagePullPolicy": "Never",
                            "command": ["sh", "-c", script],
                            "ports": [{"containerPort": 8080}],
                            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                            "resources": {"limits": {"memory": "32Mi", "cpu": "200m"}},
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def test_every_node_registers_and_is_ready(local: LocalNodes) -> None:
    nodes = json.loads(kubectl(local, "get", "nodes", "-o", "json"))["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == [f"node{i}" for i in range(1, LOCAL_NODES + 1)]
    for node in nodes:
        ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True", ready
        internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
        [own] = [n for n in local.cluster.node_list() if n.name == node["metadata"]["name"]]
        assert internal == [own.ip, own.ip6]  # dual-stack, IPv4 first
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def test_pods_spread_over_the_nodes_and_become_ready(local: LocalNodes) -> None:
    kubectl(local, "apply", "-f", "-", stdin=json.dumps(web_deployment(4)))
    found = pods.wait_ready(local.env, NAMESPACE, "app=web", count=4, timeout=120)
    assert {p["spec"]["nodeName"] for p in found} == {f"node{i}" for i in range(1, LOCAL_NODES + 1)}


def test_pod_created_to_ready_is_measured(local: LocalNodes) -> None:
    """Twelve pods, one after another: `kubectl apply` → Ready (`kubectl wait` watches). Reported (the
    issue's target: p95 ≤ 2 s), never asserted: a busy machine is not a broken one."""
    took = []
    for index in range(12):
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"timed-{index}", "namespace": NAMESPACE, "labels": {"app": "timed"}},
            "spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                "containers": [
                    {
                        "name": "main",
                        "image": BACKEND,
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "3600"],
                    }
                ],
            },
        }
        started = time.monotonic()
        kubectl(local, "apply", "-f", "-", stdin=json.dumps(manifest))
        kubectl(
            local, "wait", "--for=condition=Ready", "--timeout=120s", "-n", NAMESPACE, f"pod/timed-{index}"
        )
        took.append(time.monotonic() - started)
    kubectl(local, "delete", "pods", "-n", NAMESPACE, "-l", "app=timed", "--wait=false")
    took.sort()
    p95 = took[min(len(took) - 1, round(0.95 * (len(took) - 1)))]
    print(
        f"pod created → Ready over {len(took)}: p50 {statistics.median(took):.2f} s, p95 {p95:.2f} s, max {took[-1]:.2f} s"
    )


def test_a_cluster_ip_service_reaches_pods_on_every_node(local: LocalNodes) -> None:
    pods.wait_ready(local.env, NAMESPACE, "app=web", count=4, timeout=120)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": NAMESPACE},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    kubectl(local, "apply", "-f", "-", stdin=json.dumps(service))
    cluster_ip = kubectl(local, "get", "svc", "web", "-n", NAMESPACE, "-o", "jsonpath={.spec.clusterIP}")
    names = {p["metadata"]["name"] for p in pods.wait_ready(local.env, NAMESPACE, "app=web", count=4)}

    def get() -> str | None:
        """From node1's network namespace (host network), as a hostNetwork pod would, on a new connection."""
        try:
            return local.node_exec("node1", "curl", "-s", "--max-time", "5", f"http://{cluster_ip}/").strip()
        except PlatformError:
            return None

    # kube-proxy programs a new Service within a second or so: wait for its first answer, then count.
    harness.wait_for(f"Service {cluster_ip} to answer from node1", get, timeout=60)
    answers = [get() for _ in range(40)]
    assert set(answers) == names, answers


def test_pods_reach_the_api_server_through_the_kubernetes_service(local: LocalNodes) -> None:
    [operator] = pods.wait_ready(local.env, RELEASE_NAMESPACE, OPERATOR)
    code = (
        "import json, ssl, urllib.request; d = '/var/run/secrets/kubernetes.io/serviceaccount/'; "
        "ctx = ssl.create_default_context(cafile=d + 'ca.crt'); "
        "r = urllib.request.Request('https://10.0.0.1/version', headers={'Authorization': 'Bearer ' + open(d + 'token').read()}); "
        "print(json.load(urllib.request.urlopen(r, context=ctx, timeout=10))['gitVersion'])"
    )
    out = kubectl(
        local, "exec", "-n", RELEASE_NAMESPACE, operator["metadata"]["name"], "--", "python3", "-c", code
    )
    assert out.strip().startswith("v1."), out


def test_the_charts_operator_runs_non_root_on_a_read_only_root(local: LocalNodes) -> None:
    [operator] = pods.wait_ready(local.env, RELEASE_NAMESPACE, OPERATOR)
    name = operator["metadata"]["name"]
    status = operator["status"]["containerStatuses"][0]
    assert status["restartCount"] == 0, pods.explain(local.env, RELEASE_NAMESPACE, [operator])
    code = (
        "import errno, os\nprint(os.getuid(), os.getgid())\n"
        "try:\n    open('/probe', 'w')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
    )
    out = kubectl(local, "exec", "-n", RELEASE_NAMESPACE, name, "--", "python3", "-c", code)
    assert out.split() == ["65532", "65532", "EROFS"], out


def test_kubectl_logs_and_exec_reach_the_kubelet(local: LocalNodes) -> None:
    [operator] = pods.wait_ready(local.env, RELEASE_NAMESPACE, OPERATOR)
    name = operator["metadata"]["name"]
    logs = kubectl(local, "logs", "-n", RELEASE_NAMESPACE, name)
    assert logs.strip(), "the operator logged nothing"
    uid = kubectl(
        local, "exec", "-n", RELEASE_NAMESPACE, name, "--", "python3", "-c", "import os; print(os.getuid())"
    )
    assert uid.strip() == "65532"


def test_a_pod_spec_the_kubelet_refuses_fails_with_its_own_events(local: LocalNodes) -> None:
    # The backend image runs as root; runAsNonRoot without runAsUser is refused by the kubelet itself.
    refused = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "refused", "namespace": NAMESPACE, "labels": {"app": "refused"}},
        "spec": {
            "securityContext": {"runAsNonRoot": True},
            "containers": [
                {"name": "main", "image": BACKEND, "imagePullPolicy": "Never", "command": ["sleep", "60"]}
            ],
        },
    }
    kubectl(local, "apply", "-f", "-", stdin=json.dumps(refused))
    with pytest.raises(pods.PodTrouble) as trouble:
        pods.wait_ready(local.env, NAMESPACE, "app=refused", timeout=120)
    message = str(trouble.value)
    assert "CreateContainerConfigError" in message, message
    assert "runAsNonRoot and image will run as root" in message, message  # the kubelet's own event

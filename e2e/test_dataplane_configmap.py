"""The forwarding pod's config source on a real API server: its ConfigMap, its ServiceAccount, its report.

The operator runs under its own ServiceAccount with exactly `layerlb_operator.rbac`'s rules. One L7 proxy
LoadBalancer gets a 127.0.0.x VIP and a static endpoint served by a real local HTTP backend. No kubelet
runs, so the Deployment's pod stays Pending; the test plays the kubelet for that one pod: it starts
`layerlb dataplane` with the pod template's own arguments and POD_NAME, authenticated by a token of the
pod's ServiceAccount from the TokenRequest API (bound to the pod, as a kubelet would request it), and
sets the pod's phase and Ready condition through the status subresource. What is shown:
- the data plane serves the Plan from the ConfigMap, applies a changed Plan in place (same listening
  socket, same keep-alive connection), refuses an invalid one and keeps serving;
- it reports the generation it serves into `<name>-serving`, and `Ready` becomes True only once that
  report and the pod's Ready condition agree;
- the token can do what the Role grants and nothing more;
- deleting the LoadBalancer makes the data plane stop serving and report `removed` before the
  finalizer lets the objects go.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from layerlb_operator import objects, rbac

from e2e.cluster.cluster import Cluster
from e2e.harness import free_port, wait_for
from e2e.kube import ROOT, Kubectl
from layerlb import plan_contract

NS = "llb-e2e-dp"
SYSTEM_NS = "llb-e2e-dp-system"
NAME = "web"
VIP = "127.0.0.41"


class Backend:
    """A real HTTP server on 127.0.0.1 that answers every GET with its name."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        body = name.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # the stdlib names it
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Process:
    """A subprocess with its output in a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=10)


def apply(kubectl: Kubectl, *documents: dict[str, Any]) -> None:
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))


def get(kubectl: Kubectl, kind: str, name: str) -> dict[str, Any] | None:
    done = kubectl("get", kind, name, "-n", NS, "-o", "json")
    return json.loads(done.stdout) if done.returncode == 0 else None


def condition(kubectl: Kubectl, kind: str) -> dict[str, Any]:
    conditions = ((get(kubectl, "llb", NAME) or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def token_kubeconfig(k8s: Cluster, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with `token` only (no admin certificate)."""
    admin = yaml.safe_load(k8s.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": "user", "user": {"token": token}}],
        "contexts": [{"name": "user", "context": {"cluster": "e2e", "user": "user"}}],
        "current-context": "user",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without in-cluster hints (the subprocesses use the kubeconfig they are given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    return {**env, "LAYERLB_DEBUG": "1", **extra}


@pytest.fixture(scope="module")
def operator(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A standalone operator for NS under a ServiceAccount bound to `rbac.cluster_rules()`; yields its folder."""
    folder = tmp_path_factory.mktemp("dataplane-configmap")
    wait_for(
        f"namespace {NS} to finish terminating",
        lambda: (
            json.loads(kubectl("get", "namespace", NS, "-o", "json").stdout or "{}")
            .get("status", {})
            .get("phase")
            != "Terminating"
        ),
        timeout=90,
    )
    binding = {"kind": "ServiceAccount", "name": "layerlb-operator", "namespace": SYSTEM_NS}
    apply(
        kubectl,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "layerlb-operator", "namespace": SYSTEM_NS},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "llb-e2e-dp-operator"},
            "rules": rbac.cluster_rules(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "llb-e2e-dp-operator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "llb-e2e-dp-operator",
            },
            "subjects": [binding],
        },
    )
    token = kubectl.ok("create", "token", "layerlb-operator", "-n", SYSTEM_NS, "--duration=2h").strip()
    kubeconfig = token_kubeconfig(k8s, token, folder / "operator.kubeconfig")
    command = [sys.executable, "-m", "layerlb.cli", "operator", "--namespace", NS, "--standalone"]
    command += ["--metrics", f"127.0.0.1:{free_port()}"]
    running = Process(command, clean_env(KUBECONFIG=str(kubeconfig)), folder / "operator.log")
    try:
        yield folder
    finally:
        kubectl("delete", "llb", "--all", "-n", NS, "--wait=true", "--timeout=90s")
        running.stop()
        kubectl("delete", "namespace", NS, "--wait=false")


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    made = (Backend("backend-a"), Backend("backend-b"))
    yield made
    for backend in made:
        backend.close()


def load_balancer(port: int, backend: Backend | None) -> dict[str, Any]:
    """The LoadBalancer: a static endpoint on `backend`, or (None) the Service `app` port 80."""
    if backend is None:
        target: dict[str, Any] = {"service": {"name": "app", "port": 80}}
    else:
        target = {"endpoints": [{"address": "127.0.0.1", "port": backend.port}]}
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "mode": "L7",
            "architecture": "proxy",
            "vip": VIP,
            "replicas": 2,  # the test plays the kubelet for the first pod only
            "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}],
            "backends": [{"name": "app", **target}],
            "defaultBackend": "app",
        },
    }


def host_address() -> str:
    """A non-loopback IPv4 address of this machine: EndpointSlices refuse loopback ones."""
    found = json.loads(
        subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True, check=True
        ).stdout
    )
    addresses = [a["local"] for link in found for a in link.get("addr_info", [])]
    assert addresses, "the Service backend needs a non-loopback IPv4 address on this machine"
    return str(addresses[0])


def service(address: str, port: int) -> list[dict[str, Any]]:
    """A selector-less Service `app` (port 80, named http) and its EndpointSlice: one ready endpoint."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "app", "namespace": NS},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "app-1",
                "namespace": NS,
                "labels": {
                    "kubernetes.io/service-name": "app",
                    "endpointslice.kubernetes.io/managed-by": "e2e",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        },
    ]


def fetch(port: int, connection: http.client.HTTPConnection | None = None) -> str | None:
    """GET / through the VIP (on `connection` when given); None when nothing answers."""
    conn = connection or http.client.HTTPConnection(VIP, port, timeout=5)
    try:
        conn.request("GET", "/")
        return conn.getresponse().read().decode()
    except OSError:
        return None
    finally:
        if connection is None:
            conn.close()


def listening_inodes(port: int) -> list[int]:
    """Inodes of the sockets listening on VIP:port (the kernel's own view, /proc/net/tcp)."""
    wanted = f"{socket.inet_aton(VIP)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        return [
            int(f[9]) for f in (line.split() for line in list(table)[1:]) if f[1] == wanted and f[3] == "0A"
        ]


def serving(kubectl: Kubectl) -> dict[str, str]:
    return dict((get(kubectl, "configmap", objects.serving_configmap_name(NAME)) or {}).get("data") or {})


def play_kubelet(kubectl: Kubectl, pod: str, ready: bool) -> None:
    """Set the pod's phase and Ready condition as a kubelet would after its readiness probe."""
    state = "True" if ready else "False"
    status = {
        "phase": "Running",
        "conditions": [
            {
                "type": "Ready",
                "status": state,
                "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ],
    }
    kubectl.ok(
        "patch",
        "pod",
        pod,
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def can_i(kubeconfig: Path, kubectl: Kubectl, *args: str) -> bool:
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "auth", "can-i", *args, "-n", NS],
        capture_output=True,
        text=True,
        timeout=60,
        env={**kubectl.env, "KUBECONFIG": str(kubeconfig)},
    )
    return done.stdout.strip() == "yes"


def test_a_forwarding_pod_serves_its_configmap_reports_it_and_cleans_up_on_delete(
    operator: Path, k8s: Cluster, kubectl: Kubectl, backends: tuple[Backend, Backend]
) -> None:
    first, second = backends
    port = free_port(VIP)
    apply(kubectl, load_balancer(port, first))
    wait_for("Programmed=True", lambda: condition(kubectl, "Programmed").get("status") == "True")

    # The pod the Deployment made (Pending: no kubelet), and the command its template runs.
    selector = ",".join(f"{k}={v}" for k, v in objects.selector(NAME).items())

    def both() -> list[dict[str, Any]] | None:
        pods: list[dict[str, Any]] = json.loads(
            kubectl.ok("get", "pods", "-n", NS, "-l", selector, "-o", "json")
        )["items"]
        return pods if len(pods) == 2 else None

    pod, other = wait_for("both forwarding pods", both)
    container = pod["spec"]["containers"][0]
    assert container["command"][:4] == ["layerlb", "dataplane", "--plan-configmap", f"{NS}/{NAME}-plan"]
    uid, pod_name = pod["metadata"]["uid"], pod["metadata"]["name"]
    token = kubectl.ok(
        "create", "token", pod["spec"]["serviceAccountName"], "-n", NS, "--duration=1h",
        "--bound-object-kind=Pod", f"--bound-object-name={pod_name}", f"--bound-object-uid={uid}",
    ).strip()  # fmt: skip
    kubeconfig = token_kubeconfig(k8s, token, operator / "dataplane.kubeconfig")

    # The token: its Plan ConfigMap read-only, its report patch-only, nothing else.
    assert can_i(kubeconfig, kubectl, "get", f"configmaps/{NAME}-plan")
    assert can_i(kubeconfig, kubectl, "watch", f"configmaps/{NAME}-plan")
    assert can_i(kubeconfig, kubectl, "patch", f"configmaps/{NAME}-serving")
    for verb, resource in [
        ("patch", f"configmaps/{NAME}-plan"),
        ("get", f"configmaps/{NAME}-serving"),
        ("get", "configmaps/other"),
        ("list", "configmaps"),
        ("patch", f"pods/{pod_name}"),
        ("get", "secrets"),
        ("create", "configmaps"),
    ]:
        assert not can_i(kubeconfig, kubectl, verb, resource), f"the data plane may {verb} {resource}"
    apply(kubectl, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other", "namespace": NS}})
    refused = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "get", "configmap", "other", "-n", NS],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()

    # The data plane, as the pod's container runs it (the admin port moved off 9090 to stay free here).
    admin = free_port()
    command = [sys.executable, "-m", "layerlb.cli", *container["command"][1:-1], f"127.0.0.1:{admin}"]
    env = clean_env(KUBECONFIG=str(kubeconfig), POD_NAME=pod_name, POD_NAMESPACE=NS)
    dataplane = Process(command, env, operator / "dataplane.log")
    host = host_address()
    pair = [Backend("service-c", host), Backend("service-d", host)]
    try:
        assert wait_for("traffic through the VIP", lambda: fetch(port)) == "backend-a", dataplane.text()
        assert wait_for("the pod's report", lambda: serving(kubectl).get(pod_name)) == "1"
        ready = condition(kubectl, "Ready")
        assert (ready["status"], ready["message"]) == ("False", "0/2 forwarding pods serve generation 1")
        play_kubelet(kubectl, pod_name, ready=True)
        wait_for("Ready=True", lambda: condition(kubectl, "Ready").get("status") == "True")
        assert condition(kubectl, "Ready")["message"] == "1/2 forwarding pods serve generation 1"

        # A new backend: a new Plan, applied in place.
        sockets = listening_inodes(port)
        kept = http.client.HTTPConnection(VIP, port, timeout=5)
        assert fetch(port, kept) == "backend-a"
        apply(kubectl, load_balancer(port, second))
        assert wait_for("the new backend", lambda: fetch(port) == "backend-b" or None)
        assert fetch(port, kept) == "backend-b"  # the same keep-alive connection, now to the new backend
        assert listening_inodes(port) == sockets  # the same listening socket: nothing was closed
        assert wait_for("the report of generation 2", lambda: serving(kubectl).get(pod_name) == "2" or None)
        wait_for(
            "Ready for generation 2",
            lambda: condition(kubectl, "Ready").get("message") == "1/2 forwarding pods serve generation 2",
        )

        # A Service backend: each EndpointSlice change is a new Plan (same generation) served in place.
        apply(kubectl, *service(host, pair[0].port))
        apply(kubectl, load_balancer(port, None))
        assert wait_for("the Service backend", lambda: fetch(port) == "service-c" or None)
        delays = []
        for flip in range(8):
            backend, name = (pair[1], "service-d") if flip % 2 == 0 else (pair[0], "service-c")
            apply(kubectl, *service(host, backend.port))
            written = time.monotonic()  # the EndpointSlice is stored once kubectl returns
            wait_for(f"{name} after the EndpointSlice change", lambda: fetch(port) == name or None)  # noqa: B023
            delays.append(time.monotonic() - written)
        assert fetch(port, kept) == "service-c" and listening_inodes(port) == sockets
        print(
            f"EndpointSlice stored -> served through the VIP: {', '.join(f'{d:.2f}' for d in sorted(delays))} s"
        )
        assert wait_for("the report of generation 3", lambda: serving(kubectl).get(pod_name) == "3" or None)

        # An invalid Plan written by hand is refused; generation 3 keeps serving.
        broken = {"data": {plan_contract.PLAN_KEY: '{"name": "web", "listeners": "many"}'}}
        kubectl.ok("patch", "configmap", f"{NAME}-plan", "-n", NS, "--type=merge", "-p", json.dumps(broken))
        wait_for("the refusal in the log", lambda: "reload rejected" in dataplane.text())
        assert f"ConfigMap {NS}/{NAME}-plan: plan.json: Plan/default/web: listeners:" in dataplane.text()
        assert fetch(port, kept) == "service-c" and serving(kubectl)[pod_name] == "3"

        # A deleted pod's report is dropped (the other pod never ran: its report is written here for it).
        gone = other["metadata"]["name"]
        kubectl.ok(
            "patch",
            "configmap",
            f"{NAME}-serving",
            "-n",
            NS,
            "--type=merge",
            "-p",
            json.dumps({"data": {gone: "3"}}),
        )
        kubectl.ok("delete", "pod", gone, "-n", NS, "--wait=true")
        wait_for("the deleted pod's report to be dropped", lambda: gone not in serving(kubectl))
        assert serving(kubectl) == {pod_name: "3"}

        # Deletion: the data plane stops serving and reports `removed` before the finalizer lets go.
        started = time.monotonic()
        kubectl.ok("delete", "llb", NAME, "-n", NS, "--wait=true", "--timeout=90s")
        took = time.monotonic() - started
        assert f"reported serving removed to ConfigMap {NS}/{NAME}-serving" in dataplane.text()
        assert listening_inodes(port) == [] and fetch(port) is None
        assert took < 30, f"the deletion took {took:.1f} s"
        events = json.loads(kubectl.ok("get", "events", "-n", NS, "-o", "json"))["items"]
        assert not [e for e in events if e.get("reason") in ("CleanupTimedOut", "CleanupFailed")]
        assert dataplane.process.poll() is None, "the data plane must keep running until its pod goes"
    finally:
        code = dataplane.stop()
        for backend in pair:
            backend.close()
        print(dataplane.text()[-4000:])
    assert code == 0

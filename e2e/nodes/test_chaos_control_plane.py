"""The control plane crashes under traffic on real nodes: etcd and kube-apiserver are SIGKILLed for
`CHAOS_OUTAGE_SECONDS` (60 by default) while a client on the nodes' LAN sends requests to an L7 and an L4
LoadBalancer through their announced VIPs, then restarted from the same state (etcd's data folder, the same
command lines).

What must hold (issue #18): not one request fails (the forwarding pods keep their last Plan, the speakers
keep answering ARP, kube-proxy keeps its rules: nothing on a node needs the API server to forward); no
forwarding pod restarts; and what changed meanwhile reaches the LoadBalancer's status promptly once the
API server is back. The change: one of the L7 LoadBalancer's two Service backends turns NotReady during
the outage (its readiness file removed through the host's /proc; it keeps serving, so no request may fail
for it), which status.backends must show as 1 of 2 ready. The chain after the return: the kubelet posts the
Pod's NotReady (under a second), kube-controller-manager's EndpointSlice controller marks the endpoint (its
watches come back on client-go's reflector backoff: 45 s after a 60 s outage), the operator writes the
status: its share, from the EndpointSlice to the status, is what CATCH_UP (5 s) bounds. Traffic goes on for
10 s after the catch-up; a failed request's message carries what the nodes, the forwarding pods and the
VIPs' announcements did after the return, and kube-controller-manager's node-lifecycle lines.

Why SIGKILL and a restart rather than SIGSTOP/SIGCONT: a crash is the harsher fault (connections reset,
watches broken, the API server's caches rebuilt from etcd), and the local cluster's harness keeps every
component's command line and state, so `cluster.crash`/`cluster.restart` bring them back as they were.
Local nodes only: kind's control plane is a container this suite does not own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import harness
from e2e.cluster import cluster as local_cluster
from e2e.cluster.nodes import client_netns
from e2e.kube import Kubectl
from e2e.nodes import pods
from e2e.nodes.chart_operator import OPERATOR_PODS, RELEASE, RELEASE_NS, ChartOperator
from e2e.nodes.platform import LocalNodes, Platform
from e2e.nodes.suite import POOL, apply_example, kubectl, pod, start_backends

ROOT = Path(__file__).resolve().parents[2]
OUTAGE = float(os.environ.get("CHAOS_OUTAGE_SECONDS", "60"))
CATCH_UP = 5.0  # seconds from the changed EndpointSlice to the status showing it, after the outage
SPEAKERS = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=speaker"
CHAOS_BACKENDS = ("chaos-b1", "chaos-b2")

# The independent client: new connection per GET, one JSON line per answer with its wall-clock time, so a
# failure can be placed relative to the outage. Runs in the LAN client's network namespace, outside the
# cluster, until the stop file exists.
CLIENT_LOOP = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import client
vip, port, stop = sys.argv[2], int(sys.argv[3]), sys.argv[4]
while not os.path.exists(stop):
    [line] = client.http_get(vip, port, 1, timeout=5.0)
    print(json.dumps([time.time(), line]), flush=True)
"""


@dataclass
class Traffic:
    """One client loop against `vip:port`; `answers()` reads what it has written so far."""

    vip: str
    port: int
    out: Path
    process: subprocess.Popen[bytes]

    def answers(self) -> list[tuple[float, str]]:
        lines = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        return [(float(at), str(text)) for at, text in lines]


def _start_traffic(local: LocalNodes, vip: str, port: int, stop: Path, out: Path) -> Traffic:
    netns = f"--net=/run/netns/{client_netns(local.cluster.tag)}"
    argv = ["nsenter", netns, sys.executable, "-c", CLIENT_LOOP, str(ROOT / "e2e" / "runner"), vip, str(port)]
    with out.open("wb") as sink:
        process = subprocess.Popen([*argv, str(stop)], stdout=sink, stderr=subprocess.STDOUT)
    return Traffic(vip, port, out, process)


class Timeline:
    """What the nodes, the forwarding pods and the VIPs' announcements look like after the API server's
    return, once a second, kept when it changes: what a failed request after the outage needs explained."""

    def __init__(self, local: LocalNodes, since: float) -> None:
        self.local, self.since = local, since
        self.entries: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                nodes = json.loads(kubectl(self.local, "get", "nodes", "-o", "json"))["items"]
                objs = _get(self.local, "pods,llb", "-l", "app.kubernetes.io/component=dataplane")
                objs += _get(self.local, "llb")
            except AssertionError as error:
                summary = f"unreadable: {str(error)[:80]}"
            else:
                parts = [f"{n['metadata']['name']} Ready={_status(n, 'Ready')}" for n in nodes]
                parts += [
                    f"{o['metadata']['name']}@{o['spec']['nodeName']} Ready={_status(o, 'Ready')}"
                    for o in objs
                    if o["kind"] == "Pod"
                ]
                parts += [
                    f"{o['metadata']['name']} announced by {((o.get('status') or {}).get('announcement') or {}).get('node')}"
                    for o in objs
                    if o["kind"] == "LoadBalancer"
                ]
                summary = ", ".join(parts)
            if not self.entries or self.entries[-1][1] != summary:
                self.entries.append((time.time() - self.since, summary))

    def close(self) -> str:
        self.stop.set()
        self.thread.join(30)
        return "\n".join(f"+{at:.1f} s: {summary}" for at, summary in self.entries)


def _status(obj: dict[str, Any], kind: str) -> str:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return str(next((c["status"] for c in conditions if c["type"] == kind), "-"))


def _chaos_backends(platform: Platform) -> None:
    """Two backends behind the Service `chaos-app`, Ready while their /tmp/ready exists (an exec probe the
    kubelet runs without the API server), so the test can make one NotReady while it keeps serving."""
    manifests: list[dict[str, Any]] = []
    for name in CHAOS_BACKENDS:
        shell = (
            f"touch /tmp/ready && exec python3 /scripts/backends.py --name {name} --host 0.0.0.0 --http=9001"
        )
        manifest = pod(platform, name, ["sh", "-c", shell], {"app": "chaos-backend"})
        manifest["spec"]["containers"][0]["readinessProbe"] = {
            "exec": {"command": ["cat", "/tmp/ready"]},
            "periodSeconds": 1,
            "failureThreshold": 1,
        }
        manifests.append(manifest)
    manifests.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "chaos-app", "namespace": platform.namespace},
            "spec": {"selector": {"app": "chaos-backend"}, "ports": [{"port": 80, "targetPort": 9001}]},
        }
    )
    kubectl(platform, "apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
    pods.wait_ready(platform.env, platform.namespace, "app=chaos-backend", count=len(CHAOS_BACKENDS))


def _service_backed(document: dict[str, Any]) -> None:
    spec = document["spec"]
    spec["backends"] = [{"name": "app", "service": {"name": "chaos-app", "port": 80}}]
    spec["defaultBackend"] = "app"
    for key in ("routes", "sessionAffinity"):
        spec.pop(key, None)


def _turn_not_ready(name: str) -> None:
    """Remove the backend's readiness file through the host's view of its container (/proc/PID/root): no
    API call, so it works while the API server is down."""
    marker = f"--name\0{name}\0".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    (entry / "root" / "tmp" / "ready").unlink()
                    return
            except OSError:
                continue
    raise AssertionError(f"no process of backend {name} found")


@pytest.fixture(scope="module")
def local(platform: Platform) -> Iterator[LocalNodes]:
    if not isinstance(platform, LocalNodes):
        pytest.skip("stops the local cluster's own etcd and kube-apiserver")
    start_backends(platform)
    _chaos_backends(platform)
    try:
        yield platform
    finally:
        kubectl(platform, "delete", "llb", "--all", "-n", platform.namespace, "--wait=true", "--timeout=120s")
        kubectl(platform, "delete", "pods,service", "-n", platform.namespace, "-l", "app=chaos-backend")
        kubectl(platform, "delete", "service", "chaos-app", "-n", platform.namespace, "--ignore-not-found")
        kubectl(platform, "delete", "vippool", POOL, "--ignore-not-found")


def _get(local: LocalNodes, *what: str) -> list[dict[str, Any]]:
    listed = json.loads(kubectl(local, "get", *what, "-n", local.namespace, "-o", "json"))
    items: list[dict[str, Any]] = listed["items"] if listed.get("kind") == "List" else [listed]
    return items


def _backends_ready(lb: dict[str, Any]) -> int | None:
    backends = (lb.get("status") or {}).get("backends") or []
    return int(backends[0]["ready"]) if backends else None


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _restarts(local: LocalNodes, namespace: str, selector: str) -> dict[str, int]:
    listed = json.loads(kubectl(local, "get", "pods", "-n", namespace, "-l", selector, "-o", "json"))
    return {
        f"{p['metadata']['name']}/{p['metadata']['uid'][:8]}": sum(
            c.get("restartCount", 0) for c in (p.get("status") or {}).get("containerStatuses") or []
        )
        for p in listed["items"]
    }


def test_control_plane_crash_under_traffic_fails_no_request_and_status_catches_up(
    local: LocalNodes, tmp_path: Path
) -> None:
    """etcd and kube-apiserver SIGKILLed for CHAOS_OUTAGE_SECONDS while a LAN client sends GETs to an L7 and
    an L4 VIP: zero failed requests, no forwarding pod, speaker or operator restarted, the L4 Plan not
    rewritten, and a backend that went NotReady during the outage shows in status.backends within CATCH_UP
    s of its EndpointSlice showing it once the API server is back."""
    namespace = local.namespace
    addresses = [p["status"]["podIP"] for p in _get(local, "pods", "-l", "app=suite-backend")]
    l7 = apply_example(local, "l7-proxy-routes.yaml", sorted(addresses), "chaos-l7", _service_backed)
    l4 = apply_example(local, "l4-proxy-tcp.yaml", sorted(addresses), "chaos-l4", replicas=2)
    for name in (l7, l4):
        pods.wait_ready(local.env, namespace, f"layerlb.dev/loadbalancer={name}", count=2, timeout=300)

    def settled() -> dict[str, dict[str, Any]] | None:
        found = {lb["metadata"]["name"]: lb for lb in _get(local, "llb")}
        if all(_ready(lb) and _condition(lb, "Ready").startswith("2/2 ") for lb in found.values()):
            return found if _backends_ready(found[l7]) == 2 else None
        return None

    lbs = harness.wait_for(
        "both LoadBalancers Ready with both replicas and both chaos backends", settled, 300
    )
    stop = tmp_path / "stop"
    traffic = []
    for name in (l7, l4):
        vip = lbs[name]["status"]["vip"]
        reach = local.client_exec(sys.executable, "-c", _REACH, str(ROOT / "e2e" / "runner"), vip, "8080")
        assert not reach.startswith("ERROR"), f"{name}'s VIP {vip} never answered the LAN client: {reach}"
        traffic.append(_start_traffic(local, vip, 8080, stop, tmp_path / f"{name}.jsonl"))
    forwarding = _restarts(local, namespace, "layerlb.dev/loadbalancer")
    speakers = _restarts(local, RELEASE_NS, SPEAKERS)
    operators = _restarts(local, RELEASE_NS, OPERATOR_PODS)
    [l4_plan] = _get(local, "configmap", f"{l4}-plan")
    try:
        harness.wait_for("traffic on both VIPs", lambda: all(len(t.answers()) >= 5 for t in traffic), 60)
        outage_started = time.time()
        [not_ready] = _get(local, f"pod/{CHAOS_BACKENDS[1]}")
        not_ready_address = not_ready["status"]["podIP"]
        argvs = local_cluster.crash(local.cluster, ("kube-apiserver", "etcd"))
        _turn_not_ready(CHAOS_BACKENDS[1])
        remaining = OUTAGE - (time.time() - outage_started)
        harness.wait_for(
            "the outage's end", lambda: time.time() - outage_started >= OUTAGE, remaining + 5, 0.5
        )
        restart_began = time.time()
        local_cluster.restart(local.cluster, argvs)
        returned = time.time()
        timeline = Timeline(local, returned)
        seen: dict[str, float] = {}

        def caught_up() -> bool:
            items = _get(local, f"pod/{CHAOS_BACKENDS[1]}", f"llb/{l7}")
            slices = _get(local, "endpointslices", "-l", "kubernetes.io/service-name=chaos-app")
            now = time.time()
            if not _ready(items[0]):
                seen.setdefault("pod", now)
            if not_ready_address in {
                address
                for endpoint_slice in slices
                for endpoint in endpoint_slice.get("endpoints") or []
                if not (endpoint.get("conditions") or {}).get("ready")
                for address in endpoint["addresses"]
            }:
                seen.setdefault("slice", now)
            if _backends_ready(items[1]) == 1:
                seen.setdefault("status", now)
            return "status" in seen

        harness.wait_for(f"{l7}'s status.backends to show 1 of 2 ready", caught_up, timeout=120)
        harness.wait_for(
            "traffic after the outage", lambda: all(t.answers()[-1][0] > time.time() - 2 for t in traffic), 30
        )
        time.sleep(10)  # traffic goes on through what follows the return (node and pod conditions settling)
    finally:
        stop.touch()
        for t in traffic:
            t.process.wait(30)
    after_return = timeline.close()
    controller_manager = "\n".join(
        line
        for line in local.cluster.logs["kube-controller-manager"].read_text(errors="replace").splitlines()
        if "node_lifecycle" in line or "NotReady" in line or "Unknown" in line
    )[-4000:]
    outage_end = returned
    figures = []
    for t in traffic:
        answers = t.answers()
        failed = [(at, line) for at, line in answers if line.startswith("ERROR")]
        during = [a for a in answers if outage_started <= a[0] <= outage_end]
        figures.append(
            f"{t.vip}:{t.port}: {len(answers)} requests, {len(during)} during the outage, {len(failed)} failed"
        )
        assert during, f"{t.vip}: no request completed during the outage"
        assert not failed, (
            f"{t.vip}: {len(failed)} failed, the first at outage+{failed[0][0] - outage_started:.1f} s "
            f"(the API server returned at +{returned - outage_started:.1f} s): {failed[:5]}\n"
            f"after the return:\n{after_return}\nkube-controller-manager:\n{controller_manager}"
        )
    status_after = seen["status"] - returned
    # The chain after the API server's return: the kubelet posts the Pod's NotReady, kube-controller-manager's
    # EndpointSlice controller marks its endpoint (its watches come back on client-go's reflector backoff,
    # up to 30 s plus jitter after an outage this long), then the operator: its part is what CATCH_UP bounds.
    slice_after = seen.get("slice", seen["status"]) - returned
    print(
        f"\noutage {returned - outage_started:.1f} s (API server back {returned - restart_began:.1f} s after "
        f"its restart); after its return the backend's NotReady is visible +{seen.get('pod', 0) - returned:.1f} s, "
        f"in its EndpointSlice +{slice_after:.1f} s, in status.backends +{status_after:.1f} s; "
        + "; ".join(figures)
    )
    print(f"after the return:\n{after_return}")
    assert _restarts(local, namespace, "layerlb.dev/loadbalancer") == forwarding, "a forwarding pod restarted"
    assert _restarts(local, RELEASE_NS, SPEAKERS) == speakers, "a speaker restarted"
    # The leader rides the outage out (its writes held back) instead of exiting and cold-starting after it.
    assert _restarts(local, RELEASE_NS, OPERATOR_PODS) == operators, "the operator restarted"
    [l4_plan_after] = _get(local, "configmap", f"{l4}-plan")
    assert l4_plan_after["metadata"]["resourceVersion"] == l4_plan["metadata"]["resourceVersion"], (
        "the L4 Plan was rewritten though nothing about it changed"
    )
    assert status_after - slice_after <= CATCH_UP, (
        f"{l7}'s status showed the NotReady backend {status_after - slice_after:.1f} s after its EndpointSlice "
        f"did (+{slice_after:.1f} s after the API server's return); more than {CATCH_UP} s; the API server returned "
        f"at {time.strftime('%H:%M:%S', time.gmtime(returned))}; the operator's logs:\n"
        + "\n".join(
            line
            for p in ChartOperator(Kubectl(local.env)).pods()
            for line in Kubectl(local.env)(
                "logs", "-n", RELEASE_NS, p["metadata"]["name"]
            ).stdout.splitlines()
            if "Request attempt" not in line
        )[-8000:]
    )


def _condition(lb: dict[str, Any], kind: str) -> str:
    conditions = (lb.get("status") or {}).get("conditions") or []
    return str(next((c.get("message", "") for c in conditions if c["type"] == kind), ""))


_REACH = """
import sys
sys.path.insert(0, sys.argv[1])
import client
print(client.reachable(sys.argv[2], int(sys.argv[3]), "TCP")[0])
"""

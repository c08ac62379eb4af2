"""The Service controller's target on the local API server: Service created → `status.loadBalancer.ingress`
written, measured, not asserted. Target: p95 ≤ 1 s over 50 Services.

The operator runs as `layerlb operator` (a subprocess under its own ServiceAccount bound to the rules of
`layerlb_operator.rbac`, as in e2e/test_services.py) watching one namespace; a watch on Services records
when each one's ingress first appears. Two runs:

- one after another: each Service is created once the previous one has its address (the latency a user
  sees for one `kubectl expose`);
- a burst: all Services created back to back as fast as the client can, each timed from its own create.

    python -m bench.service_status [--count 50]

Starts (and removes) a control plane of its own unless LAYERLB_E2E_CLUSTER names a running one; no nodes
are needed, so no root. Requests go through the Kubernetes Python client, so kubectl's start-up does not
count. Figures are wall-clock on this machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "llb-bench-svc"
POOL = "llb-bench-svc-pool"
CLASS = "layerlb.dev/loadbalancer"
TARGET = 1.0
WAIT = 60.0  # seconds before one measurement counts as failed


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p95 of 50 values is the 48th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def row(what: str, values: Sequence[float], wanted: int) -> str:
    if len(values) < wanted:
        return f"{what:<32} {len(values):>3}/{wanted} measured (the rest timed out)  missed"
    p50, p95 = statistics.median(values), percentile(values, 0.95)
    verdict = "met" if p95 <= TARGET else "missed"
    return f"{what:<32} {len(values):>3}  {p50:6.3f} {p95:6.3f} {max(values):6.3f}   p95 ≤ {TARGET:.0f} s  {verdict}"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class IngressWatch:
    """A watch on the namespace's Services: the monotonic time each name first showed an ingress address."""

    def __init__(self, api: Any) -> None:
        from kubernetes import client as k8s
        from kubernetes import watch as watch_module

        self.core: Any = k8s.CoreV1Api(api)
        self.seen: dict[str, float] = {}
        self.changed = threading.Condition()
        watch: Any = watch_module  # untyped
        self._watch: Any = watch.Watch()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            for event in self._watch.stream(
                self.core.list_namespaced_service, NAMESPACE, timeout_seconds=300
            ):
                service = event["object"]
                ingress = (service.status.load_balancer.ingress or []) if service.status.load_balancer else []
                if ingress and service.metadata.name not in self.seen:
                    with self.changed:
                        self.seen[service.metadata.name] = time.monotonic()
                        self.changed.notify_all()

    def wait(self, name: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while name not in self.seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)
            return self.seen[name]


def service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "ports": [{"port": 80, "targetPort": 8080}],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.service_status",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=50, help="Services per run (default 50)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "dataplane")]

    from kubernetes import config as k8s_config_module

    from e2e import harness
    from e2e.cluster import cluster as cluster_kit
    from e2e.kube import Kubectl

    reuse = os.environ.get("LAYERLB_E2E_CLUSTER")
    workdir = Path(tempfile.mkdtemp(prefix="llb-bench-svc-"))
    cluster = cluster_kit.up(Path(reuse) if reuse else workdir / "cluster")
    kubectl = Kubectl(cluster)
    operator = None
    try:
        kubectl.ok("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        kubectl.ok("wait", "--for=condition=Established", "--timeout=120s", "crd/vippools.layerlb.dev")
        harness.fresh_namespace(kubectl, NAMESPACE)
        pool = {
            "apiVersion": "layerlb.dev/v1alpha1",
            "kind": "VIPPool",
            "metadata": {"name": POOL},
            "spec": {"addresses": ["198.18.200.0/24"], "namespaces": [NAMESPACE]},
        }
        kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(pool))
        lease = f"{NAMESPACE}/layerlb-operator"
        config = harness.operator_kubeconfig(
            cluster, kubectl, workdir, NAMESPACE, f"{NAMESPACE}-system", lease
        )
        operator = harness.Operator(config, workdir / "operator.log", NAMESPACE, lease)
        harness.wait_for(
            "the operator to lead", lambda: operator.metrics().get("layerlb_operator_leader") == 1, WAIT
        )

        k8s_config: Any = k8s_config_module  # untyped
        api = k8s_config.new_client_from_config(config_file=str(cluster.kubeconfig))
        watch = IngressWatch(api)
        print(
            f"[service-status] load average {load_average()}; {args.count} Services per run, local API server"
        )

        one_by_one: list[float] = []
        for index in range(args.count):
            name = f"one-{index:02d}"
            started = time.monotonic()
            watch.core.create_namespaced_service(NAMESPACE, service(name))
            seen = watch.wait(name, WAIT)
            if seen is not None:
                one_by_one.append(seen - started)

        burst: list[float] = []
        created: dict[str, float] = {}
        for index in range(args.count):
            name = f"burst-{index:02d}"
            created[name] = time.monotonic()
            watch.core.create_namespaced_service(NAMESPACE, service(name))
        for name, started in created.items():
            seen = watch.wait(name, WAIT)
            if seen is not None:
                burst.append(seen - started)

        print(
            f"{'Service created → ingress written':<32} {'n':>3}  {'p50':>6} {'p95':>6} {'max':>6}   (seconds)"
        )
        print(row("one after another", one_by_one, args.count))
        print(row("burst (all at once)", burst, args.count))
        print(f"[service-status] load average {load_average()} after the runs")
        return 0
    finally:
        kubectl("delete", "svc", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=120s")
        if operator is not None:
            operator.stop()
        kubectl("delete", "vippool", POOL, "--ignore-not-found")
        kubectl("delete", "namespace", NAMESPACE, "--wait=false")
        if not reuse:
            cluster_kit.down(cluster.state_dir)


if __name__ == "__main__":
    raise SystemExit(main())

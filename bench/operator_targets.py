"""The operator's latency targets on the local cluster's real nodes, with the chart's operator: measured, not asserted.

- apply → Ready: LoadBalancers created one after another (each waits for the previous one), every one an
  L4 TCP proxy with its own forwarding pod, a real pod on a real kubelet; the time from the create request
  until the LoadBalancer reports `Ready=True` for its generation. Target: p95 ≤ 2 s.
- endpoint change → new Plan served: one LoadBalancer in front of a selector-less Service whose single
  endpoint the script moves between two backend pods by updating the EndpointSlice; the time from the
  update request until a client on the nodes' LAN outside the cluster, connecting through the VIP over
  and over, first gets its answer from the new backend. Target: p95 ≤ 1 s. (The pods' serving report carries the
  LoadBalancer's generation, which an endpoint change leaves alone, so traffic is the observable here.)

    python -m bench.operator_targets [--count 20] [--changes 20]

Needs root (the nodes are network namespaces); starts (and removes) a cluster of its own. Requests go through the Kubernetes Python client,
so kubectl's own start-up does not count. Figures are wall-clock on this machine: a busy machine reads
slower, hence the load average printed with them.
"""

from __future__ import annotations

import argparse
import copy
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
NAMESPACE = "llb-targets"
POOL = "llb-targets-pool"
GROUP, VERSION, PLURAL = "layerlb.dev", "v1alpha1", "loadbalancers"
READY_TARGET = 2.0
CHANGE_TARGET = 1.0
WAIT = 120.0  # seconds before one measurement counts as failed


# ------------------------------------------------------------------------------------ in the client namespace


def poll_backend(vip: str, port: int, seconds: float) -> None:
    """GETs through the VIP on new connections, back to back; prints `seen NAME MONOTONIC` whenever the
    answering backend changes (`seen ERROR ...` for a failed request). Runs in the lab's client namespace;
    CLOCK_MONOTONIC is the same clock in every network namespace, so the times compare with the parent's."""
    import http.client

    last = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection(vip, port, timeout=2)
        try:
            connection.request("GET", "/", headers={"Host": "example.com"})
            answer = connection.getresponse()
            name = answer.read().decode(errors="replace").split(":", 1)[0] or "EMPTY"
        except (OSError, http.client.HTTPException) as error:
            name = f"ERROR {type(error).__name__}"
        finally:
            connection.close()
        if name != last:
            print(f"seen {name} {time.monotonic():.6f}", flush=True)
            last = name


# ------------------------------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p95 of 20 values is the 19th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def row(what: str, values: Sequence[float], target: float, wanted: int) -> str:
    if len(values) < wanted:
        return f"{what:<38} {len(values):>3}/{wanted:<3} measured (the rest timed out){'':>20}  missed"
    p50, p95 = statistics.median(values), percentile(values, 0.95)
    verdict = "met" if p95 <= target else "missed"
    return f"{what:<38} {len(values):>3}  {p50:6.2f} {p95:6.2f} {max(values):6.2f}   p95 ≤ {target:.0f} s  {verdict}"


# ----------------------------------------------------------------------------------------------- the bench


PHASES = ("Programmed", "pod created", "pod running", "reported", "pod ready", "Ready")
LB_LABEL = "layerlb.dev/loadbalancer"


class Timeline:
    """When each LoadBalancer of the namespace first reached each step on its way to Ready, from watches:
    `Programmed` (its objects written), its first forwarding pod created, running (the kubelet started
    its container), `reported` (the pod wrote a generation into `<name>-serving`), pod ready (its readiness
    probe passed), `Ready` (for the LoadBalancer's current generation)."""

    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client as k8s

        self.namespace = namespace
        self.marks: dict[tuple[str, str], float] = {}
        self.changed = threading.Condition()
        self.stop = threading.Event()
        custom: Any = k8s.CustomObjectsApi(api)
        core: Any = k8s.CoreV1Api(api)
        listers = {
            self._see_lb: lambda **kw: custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, **kw
            ),
            self._see_pod: lambda **kw: core.list_namespaced_pod(namespace, label_selector=LB_LABEL, **kw),
            self._see_report: lambda **kw: core.list_namespaced_config_map(
                namespace, label_selector="layerlb.dev/report=serving", **kw
            ),
        }
        for see, lister in listers.items():
            threading.Thread(target=self._run, args=(see, lister), daemon=True).start()

    def _run(self, see: Any, lister: Any) -> None:
        from kubernetes import watch as watch_module

        watch: Any = watch_module  # untyped
        while not self.stop.is_set():
            try:
                for event in watch.Watch().stream(lister, timeout_seconds=60):
                    see(event["raw_object"], time.monotonic())
                    if self.stop.is_set():
                        return
            except Exception as error:  # an expired watch, a busy API server: list and watch again
                print(f"  (watch restarts: {error})", file=sys.stderr)
                time.sleep(0.2)

    def _mark(self, name: str, phase: str, at: float) -> None:
        with self.changed:
            if (name, phase) not in self.marks:
                self.marks[(name, phase)] = at
                self.changed.notify_all()

    def _see_lb(self, lb: dict[str, Any], at: float) -> None:
        name, generation = lb["metadata"]["name"], lb["metadata"].get("generation")
        for condition in (lb.get("status") or {}).get("conditions") or []:
            current = condition["status"] == "True" and condition.get("observedGeneration") == generation
            if current and condition["type"] in ("Programmed", "Ready"):
                self._mark(name, condition["type"], at)

    def _see_pod(self, pod: dict[str, Any], at: float) -> None:
        name = pod["metadata"]["labels"][LB_LABEL]
        self._mark(name, "pod created", at)
        status = pod.get("status") or {}
        if status.get("phase") == "Running":
            self._mark(name, "pod running", at)
        if any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []):
            self._mark(name, "pod ready", at)

    def _see_report(self, config_map: dict[str, Any], at: float) -> None:
        if any(value.isdigit() for value in (config_map.get("data") or {}).values()):
            self._mark(config_map["metadata"]["labels"][LB_LABEL], "reported", at)

    def wait(self, name: str, phase: str, timeout: float) -> float | None:
        with self.changed:
            self.changed.wait_for(lambda: (name, phase) in self.marks, timeout)
            return self.marks.get((name, phase))

    def breakdown(self, started: dict[str, float]) -> str:
        """The median time of each phase after the create request, over the LoadBalancers in `started`."""
        parts = []
        for phase in PHASES:
            offsets = [self.marks[(n, phase)] - t for n, t in started.items() if (n, phase) in self.marks]
            if offsets:
                parts.append(f"{phase} {statistics.median(offsets):.2f}")
        return "median s after create: " + ", ".join(parts)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Poller:
    """`poll_backend` in the LAN client's network namespace, outside the cluster; its lines as they come."""

    def __init__(self, netns: str, vip: str, port: int, seconds: float) -> None:
        import subprocess

        code = f"from bench.operator_targets import poll_backend; poll_backend({vip!r}, {port}, {seconds})"
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", code],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.arrived:
                self.lines.append(line.strip())
                self.arrived.notify_all()

    def wait_for_line(self, prefix: str, timeout: float) -> str | None:
        """The first line so far starting with `prefix`, waiting up to `timeout` seconds for one."""
        with self.arrived:
            self.arrived.wait_for(lambda: any(x.startswith(prefix) for x in self.lines), timeout)
            return next((x for x in self.lines if x.startswith(prefix)), None)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_targets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=20, help="LoadBalancers for apply → Ready (default 20)")
    parser.add_argument("--changes", type=int, default=20, help="endpoint changes to time (default 20)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("operator_targets: run as root (the local nodes are network namespaces)")
    sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "dataplane")]

    from kubernetes import client as k8s
    from kubernetes import config as k8s_config_module

    from e2e import examples
    from e2e.cluster import nodes as node_kit
    from e2e.harness import service_and_slice
    from e2e.nodes import chart_operator, suite
    from e2e.nodes.platform import local_nodes

    workdir = Path(tempfile.mkdtemp(prefix="llb-targets-"))
    with local_nodes(workdir / "cluster", NAMESPACE, nodes=2) as platform:
        chart_operator.install(platform)
        k8s_config: Any = k8s_config_module  # untyped
        api = k8s_config.new_client_from_config(config_file=str(platform.cluster.kubeconfig))
        custom: Any = k8s.CustomObjectsApi(api)
        discovery: Any = k8s.DiscoveryV1Api(api)
        addresses = suite.start_backends(platform)[:2]
        timeline = Timeline(api, NAMESPACE)
        ready: list[float] = []
        created: dict[str, float] = {}
        changes: list[float] = []
        try:
            template = next(
                d
                for d in examples.adapt("l4-proxy-tcp.yaml", NAMESPACE, addresses)
                if d["kind"] == "LoadBalancer"
            )
            print(f"[targets] load average {load_average()}; two real nodes, the chart's operator")

            # (a) apply → Ready, one LoadBalancer after another.
            for index in range(args.count):
                body = copy.deepcopy(template)
                body["metadata"]["name"] = name = f"ready-{index:02d}"
                created[name] = started = time.monotonic()
                custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
                seen = timeline.wait(name, "Ready", WAIT)
                if seen is None:
                    print(f"  {name}: not Ready within {WAIT:.0f} s")
                    continue
                ready.append(seen - started)
                steps = [
                    f"{p} {timeline.marks[(name, p)] - started:.2f}"
                    for p in PHASES
                    if (name, p) in timeline.marks
                ]
                print(f"  {name}: Ready after {seen - started:.2f} s ({', '.join(steps[:-1])})")
            print(f"  {timeline.breakdown(created)}")
            suite.kubectl(
                platform, "delete", "llb", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=120s"
            )

            # (b) endpoint change → the new backend answers through the VIP, to a client outside the cluster.
            service = service_and_slice(NAMESPACE, "app", addresses[:1], 9001)
            suite.kubectl(platform, "apply", "-f", "-", stdin=yaml.safe_dump_all(service))
            body = copy.deepcopy(template)
            body["metadata"]["name"] = "switch"
            body["spec"]["backends"] = [
                {"name": "app", "service": {"name": "app", "port": 80}, "algorithm": "round-robin"}
            ]
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
            if timeline.wait("switch", "Ready", WAIT) is None:
                raise SystemExit(f"LoadBalancer switch not Ready within {WAIT:.0f} s")
            lb = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "switch")
            poller = Poller(node_kit.client_netns(platform.cluster.tag), lb["status"]["vip"], 8080,
                            WAIT * (args.changes + 2))  # fmt: skip
            try:
                if poller.wait_for_line("seen b1", timeout=WAIT) is None:
                    raise SystemExit(f"b1 never answered through the VIP: {poller.lines[-5:]}")
                for index in range(args.changes):
                    target = 1 - index % 2  # b2, b1, b2, ...
                    with poller.arrived:
                        poller.lines.clear()
                    started = time.monotonic()
                    _, slice_body = service_and_slice(NAMESPACE, "app", [addresses[target]], 9001)
                    discovery.replace_namespaced_endpoint_slice("app-1", NAMESPACE, slice_body)
                    line = poller.wait_for_line(f"seen b{target + 1} ", timeout=WAIT)
                    if line is None:
                        print(f"  change {index + 1}: b{target + 1} never answered")
                        continue
                    seen_at = float(line.split()[2])
                    changes.append(seen_at - started)
                    print(f"  change {index + 1} → b{target + 1}: answering after {seen_at - started:.2f} s")
            finally:
                poller.stop()
        finally:
            timeline.stop.set()
        print(f"\n[targets] load average {load_average()} (2 cores, shared)")
        print(f"{'':<38} {'n':>3}  {'p50':>6} {'p95':>6} {'max':>6}   target      verdict")
        print(row("apply → Ready (one after another)", ready, READY_TARGET, args.count))
        print(row("EndpointSlice update → new backend", changes, CHANGE_TARGET, args.changes))
        met = len(ready) == args.count and len(changes) == args.changes
        return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

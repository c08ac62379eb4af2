"""Two operator replicas on one Lease, the leader taken out while LoadBalancers change, on a real API server
without kubelets.

What must hold (issue #18): the standby takes the Lease within its bound (the 15 s duration it must see pass
without a renewal, plus one 2 s retry), converges every change made before and during the hand-over, and
the two replicas never both write: every write of one process lies before the other's first (writes are
logged per process with their time, `e2e.operator_faults.operators`). Two ways to lose a leader:
SIGKILL (a crashed pod), and SIGSTOP (a frozen one: its node stalls, its cgroup is frozen), resumed after the
standby took over with the changes it slept through still in its sockets; it must not write one of them,
and must step down.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.harness import fresh_namespace, wait_for
from e2e.kube import Kubectl
from e2e.operator_faults.operators import ObservedOperator, Write

NS = "llb-chaos-leader"
SYSTEM_NS = "llb-chaos-leader-system"
LEASE = f"{NS}/layerlb-operator"
COUNT = 10
BOUND = 15.0 + 2.0  # the Lease's duration, then the standby's next attempt (`lease.Elector`)
SLACK = 5.0  # a busy machine: the standby's thread, the PUT, the log line


def load_balancer(index: int, idle: int) -> dict[str, Any]:
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": f"lb-{index:02d}", "namespace": NS},
        "spec": {
            "mode": "L4",
            "architecture": "proxy",
            "vip": f"10.102.0.{index}",
            "listeners": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
            "backends": [{"name": "app", "endpoints": [{"address": "192.0.2.1", "port": 9000}]}],
            "timeouts": {"idleSeconds": idle},
        },
    }


def change(kubectl: Kubectl, idle: int) -> None:
    """Every LoadBalancer's idle timeout set to `idle`: a new generation for each, a Plan to rewrite."""
    documents = [load_balancer(i, idle) for i in range(COUNT)]
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))


def converged(kubectl: Kubectl, idle: int) -> bool:
    """Every LoadBalancer Programmed for its current generation, and its Plan carrying `idle`."""
    lbs = json.loads(kubectl.ok("get", "llb", "-n", NS, "-o", "json"))["items"]
    plans = {
        cm["metadata"]["name"]: cm["data"]["plan.json"]
        for cm in json.loads(kubectl.ok("get", "configmap", "-n", NS, "-o", "json"))["items"]
        if cm["metadata"]["name"].endswith("-plan")
    }
    for lb in lbs:
        generation = lb["metadata"]["generation"]
        conditions = (lb.get("status") or {}).get("conditions") or []
        if not any(
            c["type"] == "Programmed" and c["status"] == "True" and c["observedGeneration"] == generation
            for c in conditions
        ):
            return False
        plan = json.loads(plans.get(f"{lb['metadata']['name']}-plan", "{}"))
        if plan.get("generation") != generation or (plan.get("timeouts") or {}).get("idle") != idle:
            return False
    return len(lbs) == COUNT


def leading(operator: ObservedOperator) -> bool:
    return operator.metrics().get("layerlb_operator_leader") == 1


def acting(writes: list[Write]) -> list[Write]:
    """The writes that act on LoadBalancers (the Lease's own renewals are how replicas take turns)."""
    return [w for w in writes if w.kind != "Lease"]


@pytest.fixture(scope="module")
def operator_kubeconfig(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    fresh_namespace(kubectl, NS)
    folder = tmp_path_factory.mktemp("leader")
    return harness.operator_kubeconfig(k8s, kubectl, folder, NS, SYSTEM_NS, LEASE)


@pytest.fixture
def replicas(operator_kubeconfig: Path, kubectl: Kubectl) -> Iterator[list[ObservedOperator]]:
    """The test's replicas; at the end any still running is killed (a frozen one thawed first), and one
    more deletes the LoadBalancers (their finalizers are the operator's to release)."""
    started: list[ObservedOperator] = []
    yield started
    for replica in started:
        if replica.process.poll() is None:
            replica.process.send_signal(signal.SIGCONT)
            replica.kill()
    kubectl("delete", "lease", LEASE.split("/")[1], "-n", NS, "--ignore-not-found")
    folder = operator_kubeconfig.parent
    cleaner = ObservedOperator(operator_kubeconfig, folder / "cleanup.log", NS, ["--peering", LEASE])
    kubectl("delete", "llb", "--all", "-n", NS, "--wait=true", "--timeout=120s")
    cleaner.stop()
    kubectl("delete", "namespace", NS, "--wait=false")


def take_over(
    kubectl: Kubectl, old: ObservedOperator, new: ObservedOperator, out: signal.Signals, idle: int
) -> tuple[float, int]:
    """`old` (leading) gets `out` right after a change; changes go on every second until `new` leads.
    Returns the seconds from the signal to `new`'s Lease write, and the last idle timeout applied."""
    change(kubectl, idle)
    out_at = time.time()
    old.process.send_signal(out)
    deadline = time.monotonic() + BOUND + SLACK + 30
    while not leading(new) and time.monotonic() < deadline:
        idle += 1
        change(kubectl, idle)
        time.sleep(1.0)  # the pace of the changes, not a wait for a condition
    assert leading(new), f"the standby never took over:\n{new.tail()}"
    took = min(w.at for w in new.writes() if w.kind == "Lease") - out_at
    return took, idle


def test_the_standby_takes_over_a_killed_or_frozen_leader_and_the_two_never_both_write(
    operator_kubeconfig: Path, kubectl: Kubectl, replicas: list[ObservedOperator]
) -> None:
    folder = operator_kubeconfig.parent

    def replica(label: str) -> ObservedOperator:
        replicas.append(
            ObservedOperator(operator_kubeconfig, folder / f"{label}.log", NS, ["--peering", LEASE])
        )
        return replicas[-1]

    change(kubectl, 300)
    first = replica("first")
    wait_for("the first replica to lead", lambda: leading(first), timeout=60)
    second = replica("second")
    wait_for("the second replica's metrics", second.metrics, timeout=60)
    wait_for("the first leader to converge", lambda: converged(kubectl, 300), timeout=60)
    assert not acting(second.writes()), "the standby wrote while the leader held the Lease"

    # SIGKILL: the Lease is left held by a dead identity; the standby waits out its duration.
    killed_took, idle = take_over(kubectl, first, second, signal.SIGKILL, 310)
    wait_for("the new leader to converge every change", lambda: converged(kubectl, idle), timeout=60)
    first_writes, second_writes = acting(first.writes()), acting(second.writes())
    assert second_writes and max(w.at for w in first_writes) < min(w.at for w in second_writes), (
        "the replicas' writes overlap"
    )

    # SIGSTOP: the frozen leader wakes up after the hand-over with the changes it slept through.
    third = replica("third")
    wait_for("the third replica's metrics", third.metrics, timeout=60)
    assert not leading(third)
    stopped_took, idle = take_over(kubectl, second, third, signal.SIGSTOP, idle + 10)
    wait_for("the third leader to converge every change", lambda: converged(kubectl, idle), timeout=60)
    took_over = min(w.at for w in acting(third.writes()))
    resumed = time.time()
    second.process.send_signal(signal.SIGCONT)
    code = second.process.wait(timeout=60)
    late = [w for w in acting(second.writes()) if w.at >= took_over]
    print(
        f"\nhand-over after SIGKILL {killed_took:.1f} s, after SIGSTOP {stopped_took:.1f} s (bound {BOUND:.0f} s); "
        f"the frozen leader exited {code} {time.time() - resumed:.1f} s after SIGCONT with {len(late)} writes "
        f"after the hand-over ({len(second.writes('REFUSED'))} refused); writes: first {len(first_writes)}, second {len(acting(second.writes()))}, "
        f"third {len(acting(third.writes()))}"
    )
    assert not late, f"the frozen leader wrote after the hand-over: {late[:5]}\n{second.tail()}"
    assert code == 1, f"the frozen leader did not step down (exit {code}):\n{second.tail()}"
    assert killed_took <= BOUND + SLACK and stopped_took <= BOUND + SLACK, (killed_took, stopped_took)
    assert converged(kubectl, idle)

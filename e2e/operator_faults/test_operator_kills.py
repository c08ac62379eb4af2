"""The operator SIGKILLed 20 times at random points while it reconciles 100 LoadBalancers (some changed,
some deleted meanwhile), on a real API server without kubelets.

What must hold (issue #18): the last operator converges (every LoadBalancer Accepted and Programmed for its
current generation, its status naming its VIP); every LoadBalancer owns exactly the objects a kill-free run
gives it, and nothing is left of the deleted ones; no Deployment was rolled by the kills (its generation and
pod template equal the kill-free reference run's, and kube-controller-manager made one ReplicaSet for it,
not two). Kill points and changes come from a seeded generator (`CHAOS_SEED`, printed; a failure reruns with it):
each kill lands a random 0-4 s after the operator's metrics answer, which covers its start, its
initial list, the middle of a batch of writes and the quiet after it; the number of writes each killed
process made is printed to show where the kills landed.

The operators run `--standalone` (no Lease): a SIGKILLed leader's Lease would hold every successor back for
its 15 s duration; the hand-over is `test_leader_handover`'s subject.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
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
from e2e.operator_faults.operators import ObservedOperator

NS = "llb-chaos-kills"
REFERENCE_NS = "llb-chaos-reference"
SYSTEM_NS = "llb-chaos-system"
COUNT = 100
KILLS = 20
SEED = int(os.environ.get("CHAOS_SEED", "18"))
OWNED = "configmap,deployment,serviceaccount,role,rolebinding,service"


def load_balancer(namespace: str, index: int, idle: int = 300) -> dict[str, Any]:
    """An L4 proxy LoadBalancer with its own VIP and static endpoints: resolvable without a Service."""
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": f"lb-{index:03d}", "namespace": namespace},
        "spec": {
            "mode": "L4",
            "architecture": "proxy",
            "vip": f"10.{101 if namespace == REFERENCE_NS else 100}.0.{index}",
            "listeners": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
            "backends": [
                {
                    "name": "app",
                    "endpoints": [
                        {"address": "192.0.2.1", "port": 9000},
                        {"address": "192.0.2.2", "port": 9000},
                    ],
                }
            ],
            "timeouts": {"idleSeconds": idle},
        },
    }


def apply(kubectl: Kubectl, documents: list[dict[str, Any]]) -> None:
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))


def listed(kubectl: Kubectl, kinds: str, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(kubectl.ok("get", kinds, "-n", namespace, "-o", "json"))["items"]
    return items


def converged(lb: dict[str, Any]) -> bool:
    """Accepted and Programmed for the current generation, the VIP in the status."""
    generation = lb["metadata"].get("generation")
    status = lb.get("status") or {}
    done = {
        c["type"]
        for c in status.get("conditions") or []
        if c["status"] == "True" and c.get("observedGeneration") == generation
    }
    return {"Accepted", "Programmed"} <= done and status.get("vip") == lb["spec"]["vip"]


def owned_objects(kubectl: Kubectl, namespace: str) -> dict[str, list[str]]:
    """Owner LoadBalancer uid → the `kind/name` of every object it controls (orphans under "")."""
    owners: dict[str, list[str]] = {}
    for obj in listed(kubectl, OWNED, namespace):
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "kube-root-ca.crt":
            continue
        if obj["kind"] == "ServiceAccount" and obj["metadata"]["name"] == "default":
            continue
        if obj["metadata"]["name"] == f"{NS}-operator-lease":  # the test's: the operator's Lease Role
            continue
        refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]
        owner = refs[0]["uid"] if refs else ""
        owners.setdefault(owner, []).append(f"{obj['kind']}/{obj['metadata']['name']}")
    return {owner: sorted(names) for owner, names in owners.items()}


def rollout_state(kubectl: Kubectl, namespace: str) -> dict[str, tuple[int, str, int]]:
    """Deployment name → (generation, its pod template with the namespace and VIP masked, ReplicaSets)."""
    replica_sets: dict[str, int] = {}
    for rs in listed(kubectl, "replicasets", namespace):
        for ref in rs["metadata"].get("ownerReferences") or []:
            replica_sets[ref["name"]] = replica_sets.get(ref["name"], 0) + 1
    state = {}
    for deployment in listed(kubectl, "deployments", namespace):
        name = deployment["metadata"]["name"]
        template = json.dumps(deployment["spec"]["template"], sort_keys=True)
        template = template.replace(namespace, "NAMESPACE").replace("10.101.0.", "10.100.0.")
        state[name] = (deployment["metadata"]["generation"], template, replica_sets.get(name, 0))
    return state


@pytest.fixture(scope="module")
def operator_kubeconfig(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    for namespace in (NS, REFERENCE_NS):
        fresh_namespace(kubectl, namespace)
    folder = tmp_path_factory.mktemp("operator-kills")
    return harness.operator_kubeconfig(k8s, kubectl, folder, NS, SYSTEM_NS, f"{NS}/layerlb-operator")


@pytest.fixture
def started(operator_kubeconfig: Path, kubectl: Kubectl) -> Iterator[list[ObservedOperator]]:
    """Every operator the test starts; at the end any still running is killed, and one per namespace
    deletes the LoadBalancers (their finalizers are the operator's to release)."""
    running: list[ObservedOperator] = []
    yield running
    for operator in running:
        operator.kill()
    # Both namespaces at once: 170 finalizers to release take a minute one namespace after the other.
    namespaces = (NS, REFERENCE_NS)
    cleaners = [
        ObservedOperator(
            operator_kubeconfig, operator_kubeconfig.parent / f"cleanup-{ns}.log", ns, ["--standalone"]
        )
        for ns in namespaces
    ]
    deletions = [
        subprocess.Popen(
            ["kubectl", "delete", "llb", "--all", "-n", ns, "--wait=true", "--timeout=120s"],
            env=kubectl.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for ns in namespaces
    ]
    for deletion in deletions:
        deletion.wait(timeout=150)
    for cleaner, ns in zip(cleaners, namespaces, strict=True):
        cleaner.stop()
        kubectl("delete", "namespace", ns, "--wait=false")


def test_twenty_sigkills_while_reconciling_leave_no_orphan_no_duplicate_and_no_rollout(
    operator_kubeconfig: Path, kubectl: Kubectl, started: list[ObservedOperator]
) -> None:
    rng = random.Random(SEED)
    print(f"\nCHAOS_SEED={SEED}")
    folder = operator_kubeconfig.parent

    def operator(namespace: str, label: str) -> ObservedOperator:
        started.append(
            ObservedOperator(operator_kubeconfig, folder / f"{label}.log", namespace, ["--standalone"])
        )
        return started[-1]

    # The storm's schedule, drawn up front: before each start 5 LoadBalancers change, before starts 4, 9
    # and 14 another 5 are deleted; each kill a random 0-4 s after the operator's metrics answer.
    idle = dict.fromkeys(range(COUNT), 300)
    deleted: list[int] = []
    schedule = []
    for kill in range(KILLS):
        changed = rng.sample(sorted(set(idle) - set(deleted)), 5)
        for index in changed:
            idle[index] = 301 + kill
        gone = rng.sample(sorted(set(idle) - set(deleted) - set(changed)), 5) if kill in (4, 9, 14) else []
        deleted += gone
        schedule.append(([load_balancer(NS, i, idle[i]) for i in changed], gone, rng.uniform(0.0, 4.0)))

    # The reference, meanwhile: the final LoadBalancers, one operator, no kill.
    apply(kubectl, [load_balancer(REFERENCE_NS, i, idle[i]) for i in range(COUNT) if i not in deleted])
    operator(REFERENCE_NS, "reference")

    apply(kubectl, [load_balancer(NS, i) for i in range(COUNT)])
    kill_points = []
    for kill, (changes, gone, delay) in enumerate(schedule):
        apply(kubectl, changes)
        if gone:
            kubectl.ok("delete", "llb", *(f"lb-{i:03d}" for i in gone), "-n", NS, "--wait=false")
        victim = operator(NS, f"storm-{kill:02d}")
        wait_for(f"operator {kill}'s metrics", victim.metrics, timeout=60, every=0.05)
        time.sleep(delay)  # the randomised kill point itself, not a wait for a condition
        victim.kill()
        kill_points.append((round(delay, 2), len([w for w in victim.writes() if w.kind != "Event"])))
    last_kill = time.monotonic()
    print(f"kill points (s after the metrics answered, writes made): {kill_points}")

    operator(NS, "storm-final")
    remaining = {f"lb-{i:03d}" for i in range(COUNT) if i not in deleted}
    converged_at: dict[str, float] = {}

    def all_converged() -> bool:
        now = time.monotonic() - last_kill
        lbs = listed(kubectl, "llb", NS)
        for lb in lbs:
            if converged(lb):
                converged_at.setdefault(lb["metadata"]["name"], now)
        names = {lb["metadata"]["name"] for lb in lbs}
        return names == remaining and remaining <= set(converged_at) and all(converged(lb) for lb in lbs)

    wait_for("every remaining LoadBalancer converged and the deleted ones gone", all_converged, timeout=180)
    times = sorted(converged_at[name] for name in remaining)
    print(
        f"converged after the last kill: p50 {statistics.median(times):.1f} s, max {times[-1]:.1f} s "
        f"({len(remaining)} LoadBalancers, {len(deleted)} deleted during the storm)"
    )

    wait_for(
        "the reference run converged",
        lambda: (
            (found := listed(kubectl, "llb", REFERENCE_NS))
            and len(found) == len(remaining)
            and all(converged(lb) for lb in found)
        ),
        timeout=180,
    )

    uids = {lb["metadata"]["uid"]: lb["metadata"]["name"] for lb in listed(kubectl, "llb", NS)}
    reference_uids = {
        lb["metadata"]["uid"]: lb["metadata"]["name"] for lb in listed(kubectl, "llb", REFERENCE_NS)
    }

    def by_name(owners: dict[str, list[str]], names: dict[str, str]) -> dict[str, list[str]]:
        return {names.get(uid, f"deleted or foreign owner {uid}"): objs for uid, objs in owners.items()}

    expected = by_name(owned_objects(kubectl, REFERENCE_NS), reference_uids)
    assert set(expected) == remaining, sorted(expected)  # the reference itself: every object owned
    # The garbage collector removes what the deleted LoadBalancers owned; wait for it, then compare.
    wait_for(
        "exactly the reference's objects, one set per LoadBalancer, none of the deleted ones",
        lambda: by_name(owned_objects(kubectl, NS), uids) == expected,
        timeout=120,
    )
    storm, reference = rollout_state(kubectl, NS), rollout_state(kubectl, REFERENCE_NS)
    rolled = {
        name: (storm.get(name), reference[name]) for name in reference if storm.get(name) != reference[name]
    }
    assert not rolled, (
        f"{len(rolled)} Deployments differ from the kill-free run: {dict(list(rolled.items())[:2])}"
    )
    generations = {state[0] for state in storm.values()}
    print(f"Deployments: generation {generations}, one ReplicaSet each, templates equal to the reference")

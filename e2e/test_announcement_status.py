"""Who announces a VIP, in status, on a real API server: two speakers and the operator as processes.

Two `layerlb speaker` processes, each in a network namespace of its own (tests/netns.py), linked by a
veth `eth0` holding their Nodes' InternalIPs (heartbeats, ARP), under a ServiceAccount bound
to exactly the chart's speaker ClusterRole; the API server (bound to 127.0.0.1 on the host) reached
through a socat relay over a Unix socket, so the kubeconfig and its TLS name stay as they are. The Nodes
are objects only (no kubelet): Ready, their Leases renewed by the test, tainted so nothing is scheduled.
A LoadBalancer is made eligible by a forwarding pod object the test marks Running and Ready. That setup
is e2e/speakers.py's, shared with e2e/test_bgp_kube.py.

Shown: the LoadBalancer's `status.announcement` (and `kubectl get llb`'s ANNOUNCED BY), its VIP Service's
`layerlb.dev/AnnouncedIPv4` condition, a dual-stack Service whose two addresses are held by the two nodes
(one condition per family, each under its node's field manager), the operator's conditions untouched
and still its own, no write loop (resourceVersions stable), and a VIP nobody may announce cleared. A VIPPool
naming an interface the nodes lack: each speaker's `status.nodes` entry, the operator's `InterfacesFound`
condition, both gone when the spec is fixed; a deleted Node's entry removed by a live speaker.
Needs root (network namespaces) and socat.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from layerlb_operator import objects
from layerlb_speaker import announcement

from e2e import harness, speakers
from e2e.cluster.cluster import Cluster
from e2e.harness import Operator, fresh_namespace, wait_for
from e2e.kube import Kubectl

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("socat") is None, reason="needs root (network namespaces) and socat"
)

NS = "llb-announce"
TIMEOUT = 60.0
LB_VIP = "198.51.100.70"
SVC_V4, SVC_V6 = "198.51.100.71", "2001:db8:77::1"
LONELY_VIP = "198.51.100.72"
PORT = 17947  # the speakers' heartbeat port inside their namespaces
ADDRESSES = {0: "10.77.0.2", 1: "10.77.0.3"}


def _node_names() -> tuple[str, str]:
    """Two node names such that each ranks first for one family of the dual-stack Service (so the two
    addresses are announced by two nodes), the first also ranking first for the LoadBalancer's VIP."""
    v4, v6 = ipaddress.ip_address(SVC_V4), ipaddress.ip_address(SVC_V6)
    for n in range(1000):
        pair = (f"llb-ann-a{n}", f"llb-ann-b{n}")
        if (
            announcement.rank(v4, pair)[0] == pair[0]
            and announcement.rank(v6, pair)[0] == pair[1]
            and announcement.rank(ipaddress.ip_address(LB_VIP), pair)[0] == pair[0]
        ):
            return pair
    raise AssertionError("no pair of names")


NODES = _node_names()


def _get(kubectl: Kubectl, kind: str, name: str) -> dict[str, Any]:
    return harness.get(kubectl, kind, name, NS) or {}


def _managers(body: dict[str, Any], kind: str) -> set[str]:
    """The field managers owning condition `kind` of a Service's status."""
    key = f'k:{{"type":"{kind}"}}'
    owners = set()
    for entry in body["metadata"].get("managedFields") or []:
        fields = ((entry.get("fieldsV1") or {}).get("f:status") or {}).get("f:conditions") or {}
        if key in fields:
            owners.add(entry["manager"])
    return owners


@pytest.fixture(scope="module")
def lab(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The operator, two Nodes with their speakers in network namespaces, the pools."""
    from tests.netns import Topology

    folder = tmp_path_factory.mktemp("announce")
    fresh_namespace(kubectl, NS)
    nobody = {"nodeSelector": {"matchLabels": {"no-such": "label"}}}  # its VIP is announced by nobody
    pools: list[tuple[str, list[str], dict[str, Any]]] = [
        ("ann-lb", [f"{LB_VIP}/32"], {}),
        ("ann-svc", [f"{SVC_V4}/32", f"{SVC_V6}/128"], {}),
        ("ann-lonely", [f"{LONELY_VIP}/32"], {"announce": nobody}),
    ]
    speakers.apply(
        kubectl, *(speakers.pool(name, NS, addresses, **extra) for name, addresses, extra in pools)
    )
    stop = threading.Event()
    renewer = speakers.ready_nodes(
        kubectl, {name: ADDRESSES[index] for index, name in enumerate(NODES)}, stop
    )

    lease = f"{NS}/layerlb-operator"
    config = harness.operator_kubeconfig(k8s, kubectl, folder, NS, f"{NS}-op-system", lease)
    operator = Operator(config, folder / "operator.log", NS, lease)
    speaker_config = speakers.speaker_kubeconfig(k8s, kubectl, folder, NS)
    port = speakers.api_port(k8s)
    socket_path = folder / "api.sock"
    relay = speakers.api_relay(socket_path, port)
    topology = Topology("announce")
    running = []
    try:
        spaces = [topology.namespace(f"n{index}") for index in range(len(NODES))]
        topology.link(spaces[0], "eth0", spaces[1], "eth0")  # the node network: heartbeats, ARP
        for index, (space, node) in enumerate(zip(spaces, NODES, strict=True)):
            space.ip("link", "set", "lo", "up")
            space.addr("eth0", f"{ADDRESSES[index]}/24")
            running.append(
                speakers.start_speaker(
                    space, node, speaker_config, socket_path, port, PORT, "--announce-count", "1"
                )
            )
        wait_for(
            "the operator to lead", lambda: operator.metrics().get("layerlb_operator_leader") == 1, TIMEOUT
        )
        for each in running:
            each.wait_for_line("joined", timeout=TIMEOUT)
        yield {"operator": operator, "speakers": running}
    finally:
        try:
            for each in running:
                log = each.stderr()
                (folder / f"{each.what.split()[-1]}.log").write_text(log)
            kubectl("delete", "svc,llb,pod", "--all", "-n", NS, "--wait=true", "--timeout=60s")
            operator.stop()
        finally:
            topology.close()
            relay.terminate()
            relay.wait(timeout=10)
            speakers.remove_nodes(kubectl, NODES, stop, renewer)
            kubectl("delete", "vippool", *(name for name, _, _ in pools), "--ignore-not-found")
            kubectl("delete", "clusterrole,clusterrolebinding", f"{NS}-speaker", "--ignore-not-found")
            kubectl("delete", "namespace", NS, "--wait=false")


def _stable(
    kubectl: Kubectl, objects_: list[tuple[str, str]], seconds: float = 5.0, within: float = 60.0
) -> None:
    """No loop between the writers: within `within` seconds, a window of `seconds` with no write to any of
    `objects_` (kind, name). A late but final write (a busy machine: the Deployment controller's status
    arriving after the test looked) only delays the quiet window; writers feeding each other never allow one."""
    deadline = time.monotonic() + within
    versions = []
    while time.monotonic() < deadline:
        before = {key: _get(kubectl, *key)["metadata"]["resourceVersion"] for key in objects_}
        time.sleep(seconds)
        after = {key: _get(kubectl, *key)["metadata"]["resourceVersion"] for key in objects_}
        if after == before:
            return
        versions.append(after)
    raise AssertionError(f"{objects_} kept being written for {within:.0f}s: resourceVersions {versions}")


def test_a_loadbalancer_shows_its_announcing_node_and_the_operator_leaves_it_alone(
    lab: dict[str, Any], kubectl: Kubectl
) -> None:
    holder = NODES[0]
    speakers.apply(kubectl, speakers.loadbalancer(NS, "web", "ann-lb"))
    wait_for(
        "the VIP", lambda: (_get(kubectl, "llb", "web").get("status") or {}).get("vip") == LB_VIP, TIMEOUT
    )
    speakers.forwarding_pod(kubectl, NS, "web", NODES[0])
    speakers.forwarding_pod(kubectl, NS, "web", NODES[1])
    announced = wait_for(
        "status.announcement",
        lambda: (_get(kubectl, "llb", "web").get("status") or {}).get("announcement"),
        TIMEOUT,
    )
    assert {k: v for k, v in announced.items() if k != "since"} == {
        "address": LB_VIP,
        "node": holder,
        "interfaces": ["eth0"],
        "protocol": "L2",
    }
    datetime.datetime.strptime(announced["since"], "%Y-%m-%dT%H:%M:%SZ")
    table = kubectl.ok("get", "llb", "web", "-n", NS)
    header, row = table.splitlines()
    assert "ANNOUNCED BY" in header and holder in row.split()

    # Its VIP Service (layerlb's class, the VIP as ingress) gets the family's condition from the holder.
    service = objects.dataplane_name("web")
    condition = wait_for(
        "the VIP Service's condition",
        lambda: speakers.condition(_get(kubectl, "svc", service), "layerlb.dev/AnnouncedIPv4"),
        TIMEOUT,
    )
    assert (condition["status"], condition["reason"], condition["message"]) == (
        "True",
        "Announced",
        f"{LB_VIP} from {holder} on eth0",
    )

    # The operator's conditions are intact, and a write of its own (a spec change) keeps the speaker's field.
    wait_for(
        "Accepted",
        lambda: speakers.condition(_get(kubectl, "llb", "web"), "Accepted") or None,
        TIMEOUT,
    )
    kubectl.ok(
        "patch", "llb", "web", "-n", NS, "--type=merge", "-p", '{"spec": {"timeouts": {"idleSeconds": 301}}}'
    )
    body = wait_for(
        "the operator to observe generation 2",
        lambda: (
            found
            if (found := _get(kubectl, "llb", "web")).get("status", {}).get("observedGeneration") == 2
            else None
        ),
        TIMEOUT,
    )
    assert body["status"]["announcement"] == announced
    assert {c["type"] for c in body["status"]["conditions"]} >= {"Accepted", "Programmed", "Ready"}
    time.sleep(1.0)
    _stable(kubectl, [("llb", "web"), ("svc", service)])


def test_a_dual_stack_service_shows_each_family_from_its_node_next_to_the_operators_conditions(
    lab: dict[str, Any], kubectl: Kubectl
) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "dual", "namespace": NS, "annotations": {"layerlb.dev/vip-pool": "ann-svc"}},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "layerlb.dev/loadbalancer",
            "ipFamilyPolicy": "PreferDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }
    speakers.apply(kubectl, service)

    def both() -> dict[str, Any] | None:
        body = _get(kubectl, "svc", "dual")
        found = [speakers.condition(body, f"layerlb.dev/AnnouncedIPv{v}") for v in (4, 6)]
        return body if all(c and c["status"] == "True" for c in found) else None

    body = wait_for("both families' conditions", both, TIMEOUT)
    v4 = speakers.condition(body, "layerlb.dev/AnnouncedIPv4")
    v6 = speakers.condition(body, "layerlb.dev/AnnouncedIPv6")
    assert v4 and v4["message"] == f"{SVC_V4} from {NODES[0]} on eth0"
    assert v6 and v6["message"] == f"{SVC_V6} from {NODES[1]} on eth0"
    assert _managers(body, "layerlb.dev/AnnouncedIPv4") == {f"layerlb-speaker/IPv4/{NODES[0]}"}
    assert _managers(body, "layerlb.dev/AnnouncedIPv6") == {f"layerlb-speaker/IPv6/{NODES[1]}"}
    assigned = speakers.condition(body, "layerlb.dev/AddressAssigned")
    assert assigned and assigned["status"] == "True"
    assert _managers(body, "layerlb.dev/AddressAssigned") == {"layerlb-operator"}
    ingress = [i["ip"] for i in body["status"]["loadBalancer"]["ingress"]]
    assert ingress == [SVC_V4, SVC_V6]
    _stable(kubectl, [("svc", "dual")])


def test_a_service_no_longer_served_loses_the_speakers_conditions_with_the_operators(
    lab: dict[str, Any], kubectl: Kubectl
) -> None:
    """A Service that stops being a LoadBalancer gives its addresses back; nobody announces them any more, so
    the operator's release removes the speakers' `AnnouncedIPv4|6` next to its own status."""
    body = wait_for(
        "both families' conditions on service/dual",
        lambda: found if all(speakers.condition(found := _get(kubectl, "svc", "dual"), f"layerlb.dev/AnnouncedIPv{v}")
                             for v in (4, 6)) else None,
        TIMEOUT,
    )  # fmt: skip
    assert body["status"]["loadBalancer"]["ingress"]
    kubectl.ok("patch", "svc", "dual", "-n", NS, "--type=merge", "-p",
               '{"spec": {"type": "ClusterIP", "loadBalancerClass": null}}')  # fmt: skip

    def released() -> dict[str, Any] | None:
        found = _get(kubectl, "svc", "dual")
        kinds = [c["type"] for c in (found.get("status") or {}).get("conditions") or []]
        done = not kinds and not (found.get("status") or {}).get("loadBalancer", {}).get("ingress")
        return (
            found if done and "layerlb.dev/service" not in found["metadata"].get("finalizers", []) else None
        )

    wait_for("the Service released, every layerlb condition gone", released, TIMEOUT)
    _stable(kubectl, [("svc", "dual")])


def test_a_vip_nobody_may_announce_is_said_so_by_one_speaker(lab: dict[str, Any], kubectl: Kubectl) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "lonely",
            "namespace": NS,
            "annotations": {"layerlb.dev/vip-pool": "ann-lonely"},
        },
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "layerlb.dev/loadbalancer",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }
    speakers.apply(kubectl, service)
    condition = wait_for(
        "NotAnnounced",
        lambda: speakers.condition(_get(kubectl, "svc", "lonely"), "layerlb.dev/AnnouncedIPv4"),
        TIMEOUT,
    )
    assert (condition["status"], condition["reason"], condition["message"]) == (
        "False",
        "NotAnnounced",
        f"{LONELY_VIP} is not announced: no node is eligible to announce it",
    )
    clearer = announcement.rank(ipaddress.ip_address(LONELY_VIP), NODES)[0]
    assert _managers(_get(kubectl, "svc", "lonely"), "layerlb.dev/AnnouncedIPv4") == {
        f"layerlb-speaker/IPv4/{clearer}"
    }
    _stable(kubectl, [("svc", "lonely")])


def _pool(name: str, interfaces: list[str]) -> dict[str, Any]:
    """A pool of one address nobody uses (no Service, no LoadBalancer), announced on `interfaces`."""
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": name},
        "spec": {
            "addresses": ["198.51.100.90/32"],
            "namespaces": [NS],
            "autoAssign": False,
            "announce": {"interfaces": interfaces},
        },
    }


def _pool_status(
    kubectl: Kubectl, name: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """The pool, its node entries by node, and its InterfacesFound condition (empty dicts when absent)."""
    body = harness.get(kubectl, "vippool", name, None) or {}
    entries = {e["node"]: e for e in (body.get("status") or {}).get("nodes") or []}
    return body, entries, speakers.condition(body, "InterfacesFound") or {}


def _entry_managers(body: dict[str, Any]) -> dict[str, set[str]]:
    """Node → the field managers owning its entry of the pool's status.nodes."""
    owners: dict[str, set[str]] = {}
    for entry in body["metadata"].get("managedFields") or []:
        for key in ((entry.get("fieldsV1") or {}).get("f:status") or {}).get("f:nodes") or {}:
            if key.startswith("k:"):
                owners.setdefault(json.loads(key[2:])["node"], set()).add(entry["manager"])
    return owners


def test_a_pool_naming_a_missing_interface_says_so_per_node_and_in_its_condition_until_fixed(
    lab: dict[str, Any], kubectl: Kubectl
) -> None:
    """A pool naming a missing interface: each speaker writes its node's entry, the operator a False InterfacesFound
    naming the field, the interface and the nodes; a Warning Event too; all gone once the spec is fixed."""
    speakers.apply(kubectl, _pool("ann-iface", ["eth0", "llb9"]))
    try:

        def reported() -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]] | None:
            found = _pool_status(kubectl, "ann-iface")
            return found if set(found[1]) == set(NODES) and found[2].get("status") == "False" else None

        body, entries, condition = wait_for(
            "both nodes' entries and InterfacesFound=False", reported, TIMEOUT
        )
        for node in NODES:
            assert entries[node] == {"node": node, "missingInterfaces": ["llb9"], "observedGeneration": 1}
        assert _entry_managers(body) == {node: {f"layerlb-speaker/{node}"} for node in NODES}
        assert (condition["reason"], condition["observedGeneration"]) == ("InterfaceNotFound", 1)
        assert condition["message"] == (
            f"spec.announce.interfaces: llb9 not found or down on {', '.join(sorted(NODES))}"
        )
        header, row = kubectl.ok("get", "vippool", "ann-iface").splitlines()
        assert "INTERFACES FOUND" in header and row.split()[-2] == "False"
        events = wait_for(
            "the InterfaceNotFound Warnings",
            lambda: [
                e
                for e in json.loads(
                    kubectl.ok("get", "events", "-n", "default", "-o", "json",
                               "--field-selector", "involvedObject.name=ann-iface,reason=InterfaceNotFound")
                )["items"]
                if "llb9" in e["message"]
            ],
            TIMEOUT,
        )  # fmt: skip
        assert all(e["type"] == "Warning" and "spec.announce.interfaces" in e["message"] for e in events)

        kubectl.ok("patch", "vippool", "ann-iface", "--type=merge", "-p",
                   '{"spec": {"announce": {"interfaces": ["eth0"]}}}')  # fmt: skip
        body, entries, condition = wait_for(
            "no entry and InterfacesFound=True for generation 2",
            lambda: (
                found
                if not (found := _pool_status(kubectl, "ann-iface"))[1]
                and found[2].get("status") == "True"
                and found[2].get("observedGeneration") == 2
                else None
            ),
            TIMEOUT,
        )
        assert condition["reason"] == "InterfacesFound"
        assert "f:nodes" not in json.dumps(body["metadata"]["managedFields"])  # the speakers own nothing now
        _stable(kubectl, [("vippool", "ann-iface")])
    finally:
        kubectl("delete", "vippool", "ann-iface", "--ignore-not-found")


def test_the_entry_of_a_deleted_node_is_removed_by_a_live_speaker(
    lab: dict[str, Any], kubectl: Kubectl
) -> None:
    """A Node gone for good leaves its entry with nobody to remove it but the speakers, which watch Nodes."""
    gone = "llb-ann-gone"
    speakers.apply(kubectl, _pool("ann-gone", ["llb9"]), speakers.node(gone))
    try:
        wait_for(
            "the live nodes' entries",
            lambda: set(_pool_status(kubectl, "ann-gone")[1]) == set(NODES),
            TIMEOUT,
        )
        entry = {"node": gone, "missingInterfaces": ["llb9"], "observedGeneration": 1}
        document = {"apiVersion": "layerlb.dev/v1alpha1", "kind": "VIPPool", "metadata": {"name": "ann-gone"},
                    "status": {"nodes": [entry]}}  # fmt: skip
        kubectl.ok("apply", "--server-side", "--subresource=status", f"--field-manager=layerlb-speaker/{gone}",
                   "-f", "-", stdin=json.dumps(document))  # fmt: skip
        wait_for(
            "the operator to name the third node",
            lambda: gone in _pool_status(kubectl, "ann-gone")[2].get("message", ""),
            TIMEOUT,
        )
        time.sleep(2.0)
        assert gone in _pool_status(kubectl, "ann-gone")[1]  # its Node exists: nobody touches its entry

        kubectl.ok("delete", "node", gone)
        body, _, condition = wait_for(
            "the deleted node's entry removed",
            lambda: found if set((found := _pool_status(kubectl, "ann-gone"))[1]) == set(NODES)
            and gone not in found[2].get("message", "") else None,
            TIMEOUT,
        )  # fmt: skip
        assert condition["status"] == "False"  # the live nodes still lack llb9
        assert set(_entry_managers(body)) == set(NODES)
    finally:
        kubectl("delete", "vippool", "ann-gone", "--ignore-not-found")
        kubectl("delete", "node", gone, "--ignore-not-found")

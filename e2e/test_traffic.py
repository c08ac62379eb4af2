"""Traffic through the VIPs: every example on a real control plane, its forwarding pods run by the pod runner.

One control plane, one operator (under its own ServiceAccount, watching `llb-traffic`), one pod runner
and one lab network for the module. Each example is applied with `kubectl`, moved into the lab (VIP from
the lab's VIPPool, endpoints on the lab's three backends b1-b3: see `e2e/runner/lab.py`), must become
Ready (`kubectl wait --for=condition=Ready`), and then carries real requests from the lab's client
namespace, across its router, to the backends, balanced the way the example declares.

The kernel examples run on the nftables engine: this kernel has no IPVS and no IPIP. Their host-network
pods all share one node (the runner's `max_nodes=1`, placing as the scheduler's host-port check would),
as many LoadBalancers share the nodes of a real cluster.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from layerlb_operator import objects

from e2e import harness
from e2e.cluster.cluster import Cluster
from e2e.harness import Operator, wait_for
from e2e.kube import Kubectl
from e2e.runner import client, network
from e2e.runner import lab as lab_examples
from e2e.runner.network import Host
from e2e.runner.runner import PodRunner

NS = "llb-traffic"
SYSTEM_NS = "llb-traffic-system"
LEASE = f"{NS}/layerlb-operator"
POOL = "llb-traffic-pool"
READY_SECONDS = 120


@dataclass
class World:
    """What the tests share: kubectl, the runner (and its lab), the backends, apply→Ready times."""

    kubectl: Kubectl
    runner: PodRunner
    backends: list[Host]
    folder: Path
    operator: Operator
    operator_config: Path
    ready_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def addresses(self) -> list[str]:
        return [host.address for host in self.backends]

    def name_of(self, address: str) -> str:
        """b1, b2, b3: how a backend names itself in its answers."""
        return f"b{self.addresses.index(address) + 1}"


@pytest.fixture(scope="module")
def world(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    harness.fresh_namespace(kubectl, NS)
    folder = tmp_path_factory.mktemp("traffic")
    config = harness.operator_kubeconfig(k8s, kubectl, folder, NS, SYSTEM_NS, LEASE)
    operator = Operator(config, folder / "operator.log", NS, LEASE)
    runner = PodRunner(k8s.kubeconfig, [NS], folder / "runner", max_nodes=1)
    shared: World | None = None
    try:
        wait_for("the operator to lead", lambda: operator.metrics().get("layerlb_operator_leader") == 1)
        started = lab_examples.start_backends(runner.lab)
        kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(lab_examples.vip_pool(POOL, [NS])))
        shared = World(kubectl, runner, [host for host, _ in started], folder, operator, config)
        yield shared
        times = sorted(shared.ready_seconds.values())
        print(
            f"\napply -> Ready (s): {json.dumps(shared.ready_seconds)}; max {times[-1] if times else 0:.2f}"
        )
    finally:
        kubectl("delete", "llb", "--all", "-n", NS, "--wait=true", "--timeout=90s", timeout=120)
        runner.close()
        (shared.operator if shared else operator).stop()
        kubectl("delete", "vippool", POOL, "--ignore-not-found")
        kubectl("delete", "namespace", NS, "--wait=false")


def load_balancer(world: World, name: str) -> dict[str, Any]:
    found = harness.get(world.kubectl, "llb", name, NS)
    assert found is not None, f"LoadBalancer {name} is gone"
    return found


def diagnosis(world: World, name: str) -> str:
    """The LoadBalancer's status, its pods and the tail of their logs: what a failed wait needs."""
    lb = harness.get(world.kubectl, "llb", name, NS) or {}
    pods = world.kubectl(
        "get", "pods", "-n", NS, "-l", f"layerlb.dev/loadbalancer={name}", "-o", "wide"
    ).stdout
    logs = []
    for path in sorted((world.folder / "runner" / "logs").glob(f"{NS}_{name}-*.log")):
        logs.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
    return f"status: {json.dumps(lb.get('status'), indent=1)}\npods:\n{pods}\n" + "\n".join(logs)


def deploy(world: World, file: str, name: str | None = None, edit: Any = None, **spec: Any) -> dict[str, Any]:
    """Applies the example (moved into the lab; `edit(document)` may change its LoadBalancer further),
    waits for Ready with `kubectl wait`, and returns the LoadBalancer."""
    documents = lab_examples.adapt(file, NS, world.addresses, name, **spec)
    lb_document = next(d for d in documents if d["kind"] == "LoadBalancer")
    if edit is not None:
        edit(lb_document)
    lb_name = lb_document["metadata"]["name"]
    started = time.monotonic()
    world.kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
    done = world.kubectl(
        "wait", "--for=condition=Ready", f"llb/{lb_name}", "-n", NS, f"--timeout={READY_SECONDS}s",
        timeout=READY_SECONDS + 30,
    )  # fmt: skip
    assert done.returncode == 0, f"{lb_name} not Ready: {done.stderr}\n{diagnosis(world, lb_name)}"
    world.ready_seconds[lb_name] = round(time.monotonic() - started, 2)
    return load_balancer(world, lb_name)


def vip_of(lb: dict[str, Any]) -> str:
    vip: str = lb["status"]["vip"]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network("172.29.0.0/24")
    return vip


def pods_of(world: World, name: str) -> list[dict[str, Any]]:
    listed = world.kubectl.ok("get", "pods", "-n", NS, "-l", f"layerlb.dev/loadbalancer={name}", "-o", "json")
    items: list[dict[str, Any]] = json.loads(listed)["items"]
    return items


def node_of(world: World, name: str) -> Host:
    """The node namespace running a host-network LoadBalancer's (single) pod."""
    [pod] = pods_of(world, name)
    host_ip = pod["status"]["hostIP"]
    return next(h for h in world.runner.node_hosts.values() if h.address == host_ip)


def ready_replicas(world: World, deployment: str) -> int:
    found = harness.get(world.kubectl, "deployment", deployment, NS) or {}
    return int((found.get("status") or {}).get("readyReplicas") or 0)


def answers(lines: list[str]) -> collections.Counter[str]:
    """`b2:9002` → how many answers came from it; failed requests count under `ERROR`."""
    return collections.Counter("ERROR" if line.startswith("ERROR") else line.split()[0] for line in lines)


def ask(world: World, function: Any, *args: Any, **kwargs: Any) -> list[str]:
    lines: list[str] = world.runner.lab.client.call(function, *args, **kwargs)
    return lines


# ------------------------------------------------------------------------------------------ L7 and L4 proxies


def test_l7_proxy_routes_by_host_path_method_and_header(world: World) -> None:
    lb = deploy(world, "l7-proxy-routes.yaml")
    vip = vip_of(lb)
    # web, api and canary are 127.0.0.1:9001, :9002, :9003 in the example: b1, b2 and b3 here.
    cases = [
        ({"Host": "api.example.com"}, "/v1/items", "b2:9002 GET /v1/items"),
        ({"Host": "api.example.com", "X-Canary": "true"}, "/v1/items", "b3:9003 GET /v1/items"),
        ({"Host": "www.example.com"}, "/static/a.css", "b1:9001 GET /static/a.css"),
        ({"Host": "shop.example.com"}, "/", "b1:9001 GET /"),
        ({"Host": "api.example.com"}, "/v10", "b1:9001 GET /v10"),  # segment-wise prefix: not /v1
    ]
    for headers, path, expected in cases:
        [line] = ask(world, client.http_get, vip, 8080, 1, path, headers)
        assert line.startswith(expected), (headers, path, line)
        pod_ips = {p["status"]["podIP"] for p in pods_of(world, lb["metadata"]["name"])}
        assert line.split("from=")[1] in pod_ips, "an L7 proxy connects from its own (pod) address"
    # replicas: 2 → two pods, both Ready (Ready=True needs one), both behind the VIP (ECMP at the router).
    wait_for("both replicas ready", lambda: ready_replicas(world, "shop-dataplane") == 2)
    wait_for("both pods routed", lambda: len(world.runner.lab.routes().get(vip, ())) == 2)


def test_l7_https_terminates_tls_and_balances_over_all_endpoints(world: World) -> None:
    vip = vip_of(deploy(world, "l7-https.yaml"))
    over_tls = ask(world, client.http_get, vip, 8443, 9, tls_name="shop.example.com")
    assert set(answers(over_tls)) == {"b1:9001", "b2:9002", "b3:9003"}, over_tls
    assert all("host=shop.example.com" in line for line in over_tls)
    plain = ask(world, client.http_get, vip, 8080, 3)
    assert "ERROR" not in answers(plain), plain


def test_tls_keys_stay_in_secrets_and_a_renewed_certificate_is_served(world: World, tmp_path: Path) -> None:
    """The Plan ConfigMap carries no private key (ConfigMaps are readable by far more roles than Secrets);
    the pod reads the key from the Secret, which its Role allows by name and no other; renewing the Secret
    (as cert-manager does) changes the served certificate."""
    vip = vip_of(deploy(world, "l7-https.yaml"))
    stored = world.kubectl.ok(
        "get", "configmap", objects.plan_configmap_name("shop-tls"), "-n", NS, "-o", "json"
    )
    assert "BEGIN CERTIFICATE" in stored and "PRIVATE KEY" not in stored
    account = f"system:serviceaccount:{NS}:{objects.dataplane_name('shop-tls')}"
    for secret, allowed in (("shop-tls", "yes"), ("some-other-secret", "no")):
        answer = world.kubectl("auth", "can-i", "get", f"secret/{secret}", "-n", NS, "--as", account)
        assert answer.stdout.strip() == allowed, (secret, answer.stdout, answer.stderr)

    key, cert = tmp_path / "renewed.key", tmp_path / "renewed.crt"
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ),
            *(
                "-days",
                "2",
                "-subj",
                "/CN=shop.example.com",
                "-addext",
                "subjectAltName=DNS:shop.example.com",
            ),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-outform", "DER"], check=True, capture_output=True
    )
    renewed = hashlib.sha256(der.stdout).hexdigest()

    def served() -> str:
        fingerprint: str = world.runner.lab.client.call(
            client.served_certificate, vip, 8443, "shop.example.com"
        )
        return fingerprint

    before = served()
    assert not before.startswith("ERROR") and before != renewed, before
    secret = world.kubectl.ok(
        "create",
        "secret",
        "tls",
        "shop-tls",
        f"--cert={cert}",
        f"--key={key}",
        "-n",
        NS,
        "--dry-run=client",
        "-o",
        "yaml",
    )
    world.kubectl.ok("apply", "-f", "-", stdin=secret)
    wait_for(
        "the renewed certificate to be served",
        lambda: served() == renewed,
        timeout=90,
    )
    over_tls = ask(world, client.http_get, vip, 8443, 3, tls_name="shop.example.com")
    assert "ERROR" not in answers(over_tls), over_tls


def test_l4_proxy_tcp_least_connections_spreads_open_connections(world: World) -> None:
    vip = vip_of(deploy(world, "l4-proxy-tcp.yaml"))
    held = ask(world, client.http_held, vip, 8080, 3)
    assert sorted(answers(held)) == ["b1:9001", "b2:9002", "b3:9003"], held


def test_l4_proxy_udp_source_hash_keeps_a_client_on_one_backend(world: World) -> None:
    vip = vip_of(deploy(world, "l4-proxy-udp.yaml"))
    replies = ask(world, client.udp_ask, vip, 5353, 6)
    counted = answers(replies)
    assert "ERROR" not in counted and len(counted) == 1, replies
    assert replies[0].endswith("ping 0")


# ------------------------------------------------------------------------------- host network: transparent, kernel


def test_l7_transparent_backends_see_the_clients_own_address(world: World) -> None:
    lb = deploy(world, "l7-transparent.yaml")
    vip = vip_of(lb)
    node = node_of(world, lb["metadata"]["name"])
    lab_examples.route_replies_through(world.backends, node.address)
    try:
        lines = ask(world, client.http_get, vip, 8080, 12)
    finally:
        lab_examples.route_replies_through(world.backends, None)
    counted = answers(lines)
    assert "ERROR" not in counted and len(counted) >= 2, lines
    assert all(line.endswith(f"from={network.CLIENT}") for line in lines), lines


def test_l4_nat_nftables_dns_over_udp_and_tcp_keeps_the_client_address(world: World) -> None:
    lb = deploy(world, "l4-nat-nftables.yaml")
    vip = vip_of(lb)
    node = node_of(world, "dns")
    assert "table ip layerlb_" in node.namespace.run(["nft", "list", "tables"]).stdout
    lab_examples.route_replies_through(world.backends, node.address)
    try:
        over_udp = ask(world, client.udp_ask, vip, 53, 5)
        over_tcp = ask(world, client.http_get, vip, 53, 3)
    finally:
        lab_examples.route_replies_through(world.backends, None)
    udp_counted, tcp_counted = answers(over_udp), answers(over_tcp)
    assert len(udp_counted) == 1 and next(iter(udp_counted)).endswith(":5353"), over_udp  # source-hash
    assert "ERROR" not in tcp_counted and len(tcp_counted) == 1, over_tcp
    assert all(line.endswith(f"from={network.CLIENT}") for line in over_tcp), over_tcp


def test_l4_nat_ipvs_example_on_nftables_balances_by_weight(world: World) -> None:
    def on_nftables(document: dict[str, Any]) -> None:
        # nftables does round-robin or source-hash only, and no ClientIP affinity; one replica, because
        # without masquerade the backends' single return route must lead to the LB that translated.
        spec = document["spec"]
        spec.update(engine="nftables", replicas=1)
        spec.pop("sessionAffinity")
        for backend in spec["backends"]:
            backend["algorithm"] = "round-robin"

    lb = deploy(world, "l4-nat-ipvs.yaml", edit=on_nftables)
    vip = vip_of(lb)
    node = node_of(world, "postgres")
    lab_examples.route_replies_through(world.backends, node.address)
    try:
        lines = ask(world, client.http_get, vip, 5432, 40)
    finally:
        lab_examples.route_replies_through(world.backends, None)
    counted = answers(lines)
    assert "ERROR" not in counted, lines
    # weights 1, 1, 2 (10.244.3.13 is b3)
    assert counted["b3:5432"] >= 1.5 * max(counted["b1:5432"], counted["b2:5432"]) > 0, counted
    assert all(line.endswith(f"from={network.CLIENT}") for line in lines)


def test_l4_dsr_on_nftables_backends_answer_the_client_directly(world: World) -> None:
    def on_nftables(document: dict[str, Any]) -> None:
        document["spec"].update(engine="nftables")
        for backend in document["spec"]["backends"]:
            backend["algorithm"] = "round-robin"  # dsr on nftables: a hash per flow (maglev is IPVS's)

    lb = deploy(world, "l4-dsr.yaml", edit=on_nftables)
    vip = vip_of(lb)
    lab_examples.accept_vip_directly(world.backends, vip)
    lines = ask(world, client.http_get, vip, 80, 12)
    counted = answers(lines)
    assert "ERROR" not in counted and len(counted) >= 2, lines  # flows hash over the three backends
    assert all(line.endswith(f"from={network.CLIENT}") for line in lines), lines
    node = node_of(world, "video")
    assert "table netdev layerlb_" in node.namespace.run(["nft", "list", "tables"]).stdout


def admin_port_of(world: World, name: str) -> int:
    [pod] = pods_of(world, name)
    [port] = [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p.get("name") == "admin"]
    return int(port)


def test_kernel_load_balancers_share_a_node_each_on_its_own_admin_port(world: World) -> None:
    """Host-network forwarding pods take a node port for their admin server; with one fixed port a second
    kernel LoadBalancer could never run on the same node (its pod stays Pending: checked by pinning the
    port). Two share the node with the others, both carry traffic, and deleting one leaves the other."""

    def dsr_on_nftables(document: dict[str, Any]) -> None:
        document["spec"].update(engine="nftables")
        for backend in document["spec"]["backends"]:
            backend["algorithm"] = "round-robin"

    nat = deploy(world, "l4-nat-nftables.yaml", name="shared-nat")
    dsr = deploy(world, "l4-dsr.yaml", name="shared-dsr", edit=dsr_on_nftables)
    node = node_of(world, "shared-nat")
    assert node_of(world, "shared-dsr").name == node.name
    assert admin_port_of(world, "shared-nat") != admin_port_of(world, "shared-dsr")
    tables = node.namespace.run(["nft", "list", "tables"]).stdout.replace("-", "_")
    assert "layerlb_llb_traffic_shared_nat" in tables and "layerlb_llb_traffic_shared_dsr" in tables, tables

    def both_serve() -> None:
        lab_examples.route_replies_through(world.backends, node.address)
        try:
            over_udp = ask(world, client.udp_ask, vip_of(nat), 53, 3)
        finally:
            lab_examples.route_replies_through(world.backends, None)
        lab_examples.accept_vip_directly(world.backends, vip_of(dsr))
        over_dsr = ask(world, client.http_get, vip_of(dsr), 80, 6)
        assert "ERROR" not in answers(over_udp), over_udp
        assert "ERROR" not in answers(over_dsr), over_dsr

    both_serve()
    [survivor] = world.runner.pods_of("shared-dsr")
    assert survivor.process is not None
    survivor_pid = survivor.process.pid
    world.kubectl.ok("delete", "llb", "shared-nat", "-n", NS, "--wait=true", "--timeout=60s")
    wait_for(
        "the shared-nat pod to stop",
        lambda: not world.runner.pods_of("shared-nat") and world.runner.wait_idle(),
    )
    tables = node.namespace.run(["nft", "list", "tables"]).stdout.replace("-", "_")
    assert "shared_nat" not in tables and "layerlb_llb_traffic_shared_dsr" in tables, tables
    lab_examples.accept_vip_directly(world.backends, vip_of(dsr))
    after = ask(world, client.http_get, vip_of(dsr), 80, 6)
    assert "ERROR" not in answers(after), after
    [still] = world.runner.pods_of("shared-dsr")  # the other LoadBalancer's pod was never disturbed
    assert still.process is not None and (still.process.pid, still.restarts) == (survivor_pid, 0)
    world.kubectl.ok("delete", "llb", "shared-dsr", "-n", NS, "--wait=true", "--timeout=60s")


# --------------------------------------------------------------------------------------- endpoints and deletion


def _service(addresses: list[str]) -> list[dict[str, Any]]:
    """A selector-less Service `app` and the EndpointSlice the test controls (port 80 → 9001)."""
    return harness.service_and_slice(NS, "app", addresses, 9001)


def test_scaling_the_services_endpoints_moves_traffic_without_a_failed_request(
    world: World, tmp_path: Path
) -> None:
    b1, b2, b3 = world.addresses
    world.kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(_service([b1])))
    service_backed = [{"name": "app", "service": {"name": "app", "port": 80}, "algorithm": "round-robin"}]
    vip = vip_of(deploy(world, "l4-proxy-tcp.yaml", name="scaled", backends=service_backed))
    stop = tmp_path / "stop"
    background: list[str] = []
    loop = threading.Thread(
        target=lambda: background.extend(ask(world, client.http_until, vip, 8080, str(stop))), daemon=True
    )
    loop.start()
    try:
        seen: list[str] = []

        def serving(expected: set[str]) -> bool:
            lines = ask(world, client.http_get, vip, 8080, 6)
            seen.extend(lines)
            return set(answers(lines)) == expected

        wait_for("only b1 to serve", lambda: serving({"b1:9001"}))
        world.kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(_service([b1, b2, b3])))
        wait_for("all three to serve", lambda: serving({"b1:9001", "b2:9001", "b3:9001"}))
        world.kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(_service([b3])))
        wait_for("only b3 to serve", lambda: serving({"b3:9001"}))
    finally:
        stop.touch()
        loop.join(60)
    counted = answers(background)
    assert sum(counted.values()) > 20, counted  # the loop ran throughout
    assert counted["ERROR"] == 0 and answers(seen)["ERROR"] == 0, [x for x in background if "ERROR" in x][:5]
    assert {"b1:9001", "b2:9001", "b3:9001"} <= set(counted), counted


def test_restarting_the_operator_leaves_serving_pods_and_their_status_alone(world: World) -> None:
    before = {
        p["metadata"]["uid"]
        for p in json.loads(world.kubectl.ok("get", "pods", "-n", NS, "-o", "json"))["items"]
    }
    statuses = {
        o["metadata"]["name"]: o["status"]
        for o in json.loads(world.kubectl.ok("get", "llb", "-n", NS, "-o", "json"))["items"]
    }
    assert before and all(c["status"] == "True" for s in statuses.values() for c in s["conditions"]), statuses
    assert world.operator.stop() == 0
    world.operator = Operator(world.operator_config, world.folder / "operator-2.log", NS, LEASE)
    wait_for("the new operator to lead", lambda: world.operator.metrics().get("layerlb_operator_leader") == 1)
    wait_for(
        "the new operator to resume every LoadBalancer",
        lambda: (
            world.operator.metrics().get('layerlb_operator_reconciles_total{result="accepted"}', 0)
            >= len(statuses)
        ),
    )
    after = {
        p["metadata"]["uid"]
        for p in json.loads(world.kubectl.ok("get", "pods", "-n", NS, "-o", "json"))["items"]
    }
    assert after == before, "pods were replaced"
    now = {
        o["metadata"]["name"]: o["status"]
        for o in json.loads(world.kubectl.ok("get", "llb", "-n", NS, "-o", "json"))["items"]
    }
    assert now == statuses
    vip = statuses["shop"]["vip"]
    [line] = ask(world, client.http_get, vip, 8080, 1, "/", {"Host": "shop.example.com"})
    assert line.startswith("b1:9001 GET /"), line


def test_broken_load_balancers_are_refused_with_a_reason_and_the_others_keep_serving(
    world: World, tmp_path: Path
) -> None:
    """A missing Service and a taken VIP each get Accepted=False with their reason, no forwarding pod, and
    nothing changes for a LoadBalancer already serving: its status stays, and its traffic never fails."""
    shop = load_balancer(world, "shop")
    vip = shop["status"]["vip"]
    stop = tmp_path / "stop"
    background: list[str] = []
    loop = threading.Thread(
        target=lambda: background.extend(ask(world, client.http_until, vip, 8080, str(stop))), daemon=True
    )
    loop.start()
    missing = [{"name": "app", "service": {"name": "nowhere", "port": 80}}]
    broken = {
        "no-service": (
            "BackendNotFound",
            lab_examples.adapt("l4-proxy-tcp.yaml", NS, world.addresses, "no-service", backends=missing),
        ),
        "taken-vip": (
            "VIPConflict",
            lab_examples.adapt("l4-proxy-tcp.yaml", NS, world.addresses, "taken-vip", vip=vip),
        ),
    }
    try:
        for _, documents in broken.values():
            world.kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
        for name, (reason, _) in broken.items():

            def refused(name: str = name, reason: str = reason) -> bool:
                conditions = (load_balancer(world, name).get("status") or {}).get("conditions") or []
                accepted: dict[str, Any] = next((c for c in conditions if c["type"] == "Accepted"), {})
                return accepted.get("status") == "False" and accepted.get("reason") == reason

            wait_for(f"{name}: Accepted=False {reason}", refused)
            assert not pods_of(world, name), f"{name} got a forwarding pod"
        # The refusals are written; a few more requests to the serving VIP after them.
        wait_for("requests after the refusals", lambda: len(ask(world, client.http_get, vip, 8080, 3)) == 3)
    finally:
        stop.touch()
        loop.join(60)
        world.kubectl("delete", "llb", *broken, "-n", NS, "--wait=true", "--timeout=60s")
    counted = answers(background)
    assert sum(counted.values()) > 5 and counted["ERROR"] == 0, background[:5]
    assert load_balancer(world, "shop")["status"] == shop["status"]


def test_deleting_a_load_balancer_removes_its_pods_kernel_state_and_vip(world: World) -> None:
    lb = deploy(world, "l4-nat-nftables.yaml", name="gone")
    vip = vip_of(lb)
    node = node_of(world, "gone")
    table = f"layerlb_{NS}_gone".replace("-", "_")
    tables = node.namespace.run(["nft", "list", "tables"]).stdout
    assert "layerlb_" in tables and vip in node.namespace.ip("-br", "addr", "show", "dev", "lo"), tables

    world.kubectl.ok("delete", "llb", "gone", "-n", NS, "--wait=true", "--timeout=60s")
    wait_for("the garbage collector to remove the pods", lambda: not pods_of(world, "gone"), timeout=60)
    wait_for(
        "the runner to stop the pod",
        lambda: not world.runner.pods_of("gone") and world.runner.wait_idle(),
    )
    remaining = node.namespace.run(["nft", "list", "tables"]).stdout
    assert table not in remaining.replace("-", "_"), remaining  # the node's other LoadBalancers keep theirs
    assert vip not in node.namespace.ip("-br", "addr", "show", "dev", "lo")
    assert vip not in world.runner.lab.routes()
    # The VIP is free again: another LoadBalancer may ask for exactly it.
    again = deploy(world, "l4-proxy-tcp.yaml", name="again", vip=vip)
    assert again["status"]["vip"] == vip

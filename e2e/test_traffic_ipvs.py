"""The IPVS examples (l4-nat-ipvs, l4-dsr, l4-tunnel) on the IPVS engine, their pods in a QEMU guest.

This kernel has no IPVS and no IPIP, so the control plane and the operator run here as for every e2e
module, the LoadBalancers are applied here with `kubectl`, and their forwarding pods run inside a guest
booting Debian's kernel (`e2e/guest/`): the pod runner, the lab's backends and client, and the pods'
`ipvsadm` all work there, talking to this API server through QEMU's user network (10.0.2.2, a SAN of
its certificate). One boot serves the whole module (`e2e/runner/guest_scenario.py`); the tests read
what it recorded. Expect a few minutes: everything in the guest runs under emulation.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import examples, harness
from e2e.cluster.cluster import GUEST_HOST_IP, Cluster
from e2e.guest.guest import run_guest
from e2e.harness import Operator, wait_for
from e2e.kube import Kubectl
from e2e.runner import network

NS = "llb-ipvs"
SYSTEM_NS = "llb-ipvs-system"
LEASE = f"{NS}/layerlb-operator"
POOL = "llb-ipvs-pool"
# A fresh lab's first three backends (the guest's scenario checks that its lab agrees).
BACKENDS = [str(address) for address in list(network.BACKENDS.hosts())[1:4]]
LOAD_BALANCERS: list[dict[str, Any]] = [
    {"file": "l4-nat-ipvs.yaml", "name": "postgres", "prepare": "nat", "protocol": "http", "port": 5432, "count": 8},
    {"file": "l4-dsr.yaml", "name": "video", "prepare": "dsr", "protocol": "http", "port": 80, "count": 8},
    {"file": "l4-tunnel.yaml", "name": "game", "prepare": "tunnel", "protocol": "udp", "port": 7777, "count": 8},
]  # fmt: skip


def _guest_kubeconfig(k8s: Cluster, folder: Path) -> Path:
    """The admin kubeconfig with the API server as the guest reaches it."""
    config = yaml.safe_load(k8s.kubeconfig.read_text())
    port = k8s.server.rsplit(":", 1)[1]
    config["clusters"][0]["cluster"]["server"] = f"https://{GUEST_HOST_IP}:{port}"
    path = folder / "guest.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def outcome(
    k8s: Cluster, kubectl: Kubectl, crds_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    harness.fresh_namespace(kubectl, NS)
    folder = tmp_path_factory.mktemp("ipvs")
    config = harness.operator_kubeconfig(k8s, kubectl, folder, NS, SYSTEM_NS, LEASE)
    operator = Operator(config, folder / "operator.log", NS, LEASE)
    try:
        wait_for("the operator to lead", lambda: operator.metrics().get("layerlb_operator_leader") == 1)
        pool = examples.vip_pool(POOL, [NS], "172.29.1.10-172.29.1.250")
        kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(pool))
        for item in LOAD_BALANCERS:
            documents = examples.adapt(item["file"], NS, BACKENDS, item["name"])
            if item["prepare"] == "nat":  # without masquerade, backends' one return route means one director
                documents[0]["spec"]["replicas"] = 1
            kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
        plan = {
            "kubeconfig": str(_guest_kubeconfig(k8s, folder)),
            "namespace": NS,
            "backends": BACKENDS,
            "result": str(folder / "result.json"),
            "loadbalancers": LOAD_BALANCERS,
        }
        (folder / "plan.json").write_text(json.dumps(plan))
        run = run_guest(
            [sys.executable, "-m", "e2e.runner.guest_scenario", str(folder / "plan.json")],
            share=folder,
            timeout=900,
            network=True,
            env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )
        result_path = folder / "result.json"
        assert result_path.exists(), (
            f"the guest wrote no result (exit {run.exit_code}):\n{run.output[-3000:]}"
        )
        result: dict[str, Any] = json.loads(result_path.read_text())
        assert "error" not in result, f"{result['error']}\n{run.output[-3000:]}"
        print(
            f"\nguest: boot {run.boot_seconds:.1f} s, wall {run.wall_seconds:.1f} s; Ready after {result['ready_seconds']} s"
        )
        yield result
    finally:
        kubectl("delete", "llb", "--all", "-n", NS, "--wait=true", "--timeout=90s", timeout=120)
        operator.stop()
        kubectl("delete", "vippool", POOL, "--ignore-not-found")
        kubectl("delete", "namespace", NS, "--wait=false")


def _backends(lines: list[str]) -> collections.Counter[str]:
    return collections.Counter("ERROR" if line.startswith("ERROR") else line.split()[0] for line in lines)


def test_nat_on_ipvs_keeps_a_client_on_one_backend_and_its_address(outcome: dict[str, Any]) -> None:
    lines = outcome["answers"]["postgres"]
    counted = _backends(lines)
    assert "ERROR" not in counted and len(counted) == 1, lines  # sessionAffinity ClientIP
    assert all(line.endswith(f"from={network.CLIENT}") for line in lines), lines
    table = outcome["ipvs"]["postgres"]
    assert "lc" in table and "persistent 1800" in table and "Masq" in table, table


def test_dsr_on_ipvs_backends_answer_the_client_directly(outcome: dict[str, Any]) -> None:
    lines = outcome["answers"]["video"]
    counted = _backends(lines)
    assert "ERROR" not in counted and len(counted) == 1, lines  # maglev hashes the client's address
    assert all(line.endswith(f"from={network.CLIENT}") for line in lines), lines
    table = outcome["ipvs"]["video"]
    assert "mh" in table and "Route" in table and "mh-port" not in table, table


def test_tunnel_on_ipvs_carries_udp_in_ip_in_ip(outcome: dict[str, Any]) -> None:
    lines = outcome["answers"]["game"]
    counted = _backends(lines)
    assert "ERROR" not in counted and len(counted) == 1, lines  # source-hash and ClientIP affinity
    assert all(line.split(" ", 1)[1].startswith("ping") for line in lines), lines
    table = outcome["ipvs"]["game"]
    # source-hash under tunnel: Maglev by client address, the same table on every node (ECMP).
    assert "mh" in table and "Tunnel" in table, table


def test_deleting_them_removes_their_ipvs_services(outcome: dict[str, Any]) -> None:
    for name, vip in outcome["vips"].items():
        assert vip in outcome["ipvs"][name], outcome["ipvs"][name]
        assert vip not in outcome["ipvs_after_delete"][name], outcome["ipvs_after_delete"][name]

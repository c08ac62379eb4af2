"""The IPVS examples' forwarding pods and traffic, run inside the QEMU guest (Debian's kernel has IPVS, IPIP).

    python -m e2e.runner.guest_scenario PLAN.json

The host applied the LoadBalancers with `kubectl` and runs the control plane and the operator; inside
the guest this one process (imports are slow under emulation) brings up the guest's `eth0` on QEMU's
user network, runs the pod runner (its relay dials the API server at 10.0.2.2, the host's loopback),
starts the lab's backends, waits until every LoadBalancer is Ready, then for each in turn prepares the
backends as its architecture needs, sends the requests and records the answers. PLAN.json:

    {"kubeconfig": PATH, "namespace": NS, "backends": [ADDRESS, ...], "result": PATH,
     "loadbalancers": [{"name": N, "prepare": "nat"|"dsr"|"tunnel", "protocol": "http"|"udp",
                        "port": P, "count": C}, ...]}

Last, it deletes the LoadBalancers (while their pods still run, so that they remove their IPVS state).
The result file gets {"ready_seconds": S, "answers": {name: [line, ...]}, "vips": {name: vip},
"ipvs": {name: `ipvsadm -Ln` of its node}, "ipvs_after_delete": {...}} or {"error": text}; the
host's test asserts on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from e2e.runner import client, lab
from e2e.runner.network import Host
from e2e.runner.runner import PodRunner


def _kubectl(kubeconfig: str, *args: str) -> str:
    done = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _prepare(kind: str, backends: list[Host], vip: str, node: str) -> None:
    if kind == "nat":  # replies must pass the director that translated them
        lab.route_replies_through(backends, node)
    elif kind == "dsr":
        lab.accept_vip_directly(backends, vip)
    elif kind == "tunnel":  # IPIP: decapsulate on tunl0, which holds the VIP; replies go straight back
        for host in backends:
            namespace = host.namespace
            namespace.ip("link", "set", "tunl0", "up")
            if vip not in namespace.ip("-br", "addr", "show", "dev", "tunl0"):
                namespace.ip("addr", "add", f"{vip}/32", "dev", "tunl0")
            for key in ("all", "default", "tunl0", "eth0"):
                namespace.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
            namespace.sysctl("net.ipv4.conf.all.arp_ignore", 1)
            namespace.sysctl("net.ipv4.conf.all.arp_announce", 2)
    else:
        raise ValueError(f"unknown preparation {kind!r}")


def scenario(plan: dict[str, Any]) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "eth0", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "10.0.2.15/24", "dev", "eth0"], check=True)
    kubeconfig, namespace = plan["kubeconfig"], plan["namespace"]
    workdir = Path(plan["result"]).parent / "runner"
    with PodRunner(Path(kubeconfig), [namespace], workdir) as runner:
        backends = [host for host, _ in lab.start_backends(runner.lab)]
        addresses = [host.address for host in backends]
        if addresses != plan["backends"]:
            raise RuntimeError(
                f"the lab's backends are {addresses}, the host adapted the examples to {plan['backends']}"
            )
        names = [f"llb/{item['name']}" for item in plan["loadbalancers"]]
        started = time.monotonic()
        _kubectl(kubeconfig, "wait", "--for=condition=Ready", "--timeout=400s", "-n", namespace, *names)
        ready_seconds = time.monotonic() - started
        answers: dict[str, list[str]] = {}
        vips: dict[str, str] = {}
        for item in plan["loadbalancers"]:
            name = item["name"]
            lb = json.loads(_kubectl(kubeconfig, "get", "llb", name, "-n", namespace, "-o", "json"))
            vip = vips[name] = lb["status"]["vip"]
            [node] = [r.host.address for r in runner.pods_of(name)]
            _prepare(item["prepare"], backends, vip, node)
            try:
                if item["protocol"] == "udp":
                    answers[name] = runner.lab.client.call(client.udp_ask, vip, item["port"], item["count"])
                else:
                    answers[name] = runner.lab.client.call(client.http_get, vip, item["port"], item["count"])
            finally:
                lab.route_replies_through(backends, None)
        nodes = {r.lb: r.host for r in runner.pods_of_all()}
        ipvs = {name: host.namespace.run(["ipvsadm", "-Ln"]).stdout for name, host in nodes.items()}
        # Deleting them here, while their pods run, lets the pods remove their IPVS services first.
        _kubectl(kubeconfig, "delete", "llb", "--all", "-n", namespace, "--wait=true", "--timeout=300s")
        deadline = time.monotonic() + 300
        while any(runner.pods_of(name) for name in nodes) and time.monotonic() < deadline:
            time.sleep(0.5)
        runner.wait_idle(60)
        after = {name: host.namespace.run(["ipvsadm", "-Ln"]).stdout for name, host in nodes.items()}
    return {
        "ready_seconds": round(ready_seconds, 1),
        "answers": answers,
        "vips": vips,
        "ipvs": ipvs,
        "ipvs_after_delete": after,
    }


def main(argv: list[str]) -> int:
    plan = json.loads(Path(argv[0]).read_text())
    try:
        outcome = scenario(plan)
    except Exception as error:
        outcome = {"error": f"{error}\n{traceback.format_exc()}"}
    Path(plan["result"]).write_text(json.dumps(outcome, indent=1))
    return 0 if "error" not in outcome else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

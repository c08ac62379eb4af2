"""`python -m e2e.runner.demo`: the examples serving real traffic on the local cluster (what `make demo` ends with).

Starts the pod runner and the examples' backends in its lab, applies every example with `kubectl`
(moved into the lab as the e2e tests do, see `e2e/runner/lab.py`), waits until each is Ready, then
prints and runs client commands against the VIPs from the lab's client namespace. Unless `--once`, it
keeps serving until Ctrl-C, so the printed commands can be tried from another shell.

The operator must already run (demo.sh starts it). Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e.runner import lab as lab_examples
from e2e.runner.network import Host
from e2e.runner.runner import PodRunner

POOL = "demo-lab"


def _nftables(algorithm: str) -> Callable[[dict[str, Any]], None]:
    """IPVS examples on this kernel's nftables engine (no IPVS here): its algorithms, no ClientIP affinity."""

    def edit(document: dict[str, Any]) -> None:
        spec = document["spec"]
        spec.update(engine="nftables", replicas=1)
        spec.pop("sessionAffinity", None)
        for backend in spec["backends"]:
            backend["algorithm"] = algorithm

    return edit


@dataclass
class Example:
    """One example in the demo: which backends it uses and how a client tries it."""

    file: str
    backends: str  # "shared", or a group of its own when replies must route back through its node
    tries: list[str]  # shell commands, `{vip}` replaced
    edit: Callable[[dict[str, Any]], None] | None = None
    direct_return: bool = False  # dsr: backends hold the VIP
    name: str = field(default="")


UDP = (
    'python3 -c "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); '
    "s.sendto(b'hello', ('{vip}', {port})); print(s.recv(200).decode())\""
)
EXAMPLES = [
    Example("l7-proxy-routes.yaml", "shared", [
        "curl -s -H 'Host: api.example.com' http://{vip}:8080/v1/items",
        "curl -s -H 'Host: api.example.com' -H 'X-Canary: true' http://{vip}:8080/v1/items",
        "curl -s -H 'Host: www.example.com' http://{vip}:8080/static/app.css",
    ]),
    Example("l7-https.yaml", "shared", [
        "curl -sk --resolve shop.example.com:8443:{vip} https://shop.example.com:8443/",
    ]),
    Example("l4-proxy-tcp.yaml", "shared", ["curl -s http://{vip}:8080/"]),
    Example("l4-proxy-udp.yaml", "shared", [UDP.replace("{port}", "5353")]),
    Example("l7-transparent.yaml", "transparent", ["curl -s http://{vip}:8080/"]),
    Example("l4-nat-nftables.yaml", "nat", [UDP.replace("{port}", "53"), "curl -s http://{vip}:53/"]),
    Example("l4-nat-ipvs.yaml", "nat-ipvs", ["curl -s http://{vip}:5432/"], _nftables("round-robin")),
    Example("l4-dsr.yaml", "shared", ["curl -s http://{vip}:80/"], _nftables("round-robin"), True),
]  # fmt: skip


def kubectl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.runner.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default="demo")
    parser.add_argument("--once", action="store_true", help="stop after running the client commands")
    args = parser.parse_args(argv)
    kubeconfig = Path(os.environ.get("KUBECONFIG", ""))
    if not kubeconfig.is_file():
        raise SystemExit("KUBECONFIG must name the cluster's admin kubeconfig (demo.sh sets it)")
    workdir = Path(tempfile.mkdtemp(prefix="layerlb-demo-"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with PodRunner(kubeconfig, [args.namespace], workdir) as runner:
        groups: dict[str, list[Host]] = {}
        for example in EXAMPLES:
            if example.backends not in groups:
                groups[example.backends] = [
                    host for host, _ in lab_examples.start_backends(runner.lab, 3, f"{example.backends}-")
                ]
        print(f"[demo] lab: client namespace {runner.lab.client.name}; backends {len(groups) * 3} namespaces")
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump(lab_examples.vip_pool(POOL, [args.namespace])))
        for example in EXAMPLES:
            addresses = [host.address for host in groups[example.backends]]
            documents = lab_examples.adapt(example.file, args.namespace, addresses)
            document = next(d for d in documents if d["kind"] == "LoadBalancer")
            if example.edit:
                example.edit(document)
            example.name = document["metadata"]["name"]
            kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
        print(
            "[demo] l4-tunnel.yaml is left out: IP-in-IP needs IPVS and the ipip module, which this kernel lacks"
        )
        names = [f"llb/{example.name}" for example in EXAMPLES]
        print(
            f"[demo] waiting for {len(names)} LoadBalancers to be Ready (forwarding pods started by the runner)"
        )
        kubectl("wait", "--for=condition=Ready", "--timeout=120s", "-n", args.namespace, *names)
        print(kubectl("get", "llb", "-n", args.namespace, *[n.split("/")[1] for n in names]))
        client = runner.lab.client.name or ""
        for example in EXAMPLES:
            lb = json.loads(kubectl("get", "llb", example.name, "-n", args.namespace, "-o", "json"))
            vip = lb["status"]["vip"]
            hosts = groups[example.backends]
            if example.direct_return:
                lab_examples.accept_vip_directly(hosts, vip)
            elif example.backends != "shared":
                selector = f"layerlb.dev/loadbalancer={example.name}"
                listed = kubectl("get", "pods", "-n", args.namespace, "-l", selector, "-o", "json")
                [pod] = json.loads(listed)["items"]
                lab_examples.route_replies_through(hosts, pod["status"]["hostIP"])
            print(f"\n# {example.file} ({lb['spec']['mode']} {lb['spec']['architecture']}): VIP {vip}")
            for command in example.tries:
                line = f"ip netns exec {client} {command.replace('{vip}', vip)}"
                print(f"$ {line}")
                done = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=30)
                print((done.stdout or done.stderr).rstrip() or f"(exit {done.returncode})")
        print(f"\n[demo] container logs: {workdir / 'logs'}")
        if not args.once:
            print("[demo] the VIPs keep serving; run the commands above from another shell. Ctrl-C stops.")
            sys.stdout.flush()
            stop.wait()
        kubectl("delete", "llb", "--all", "-n", args.namespace, "--wait=true", "--timeout=60s")
    print("[demo] stopped: forwarding pods, backends and the lab's namespaces are gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())

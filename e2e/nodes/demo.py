"""`python -m e2e.nodes.demo`: layerlb as a user meets it, on the local cluster's real nodes (`make demo`).

Builds the project's images without Docker (`e2e/images`), starts the local cluster with real nodes
(`e2e/cluster`, kept running afterwards: `make cluster-down` stops it), installs the chart with Helm,
shows a broken resource refused by the CLI and the API server with the same message, applies every
example this kernel can run (moved onto three backend pods, VIPs from a VIPPool), waits until each is
Ready, and runs client commands from a client outside the cluster (the nodes' network namespace) through
the VIPs. Unless `--once`, the VIPs keep serving until Ctrl-C, so the printed commands work from another
shell. Each step prints how long it took. Needs root (network namespaces, containerd).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from e2e import harness
from e2e.cluster import cluster as local_cluster
from e2e.cluster import nodes as node_kit
from e2e.images import build
from e2e.nodes import pods
from e2e.nodes.platform import LocalNodes, chart_default_image
from e2e.nodes.suite import apply_example, kubectl, start_backends

ROOT = Path(__file__).resolve().parents[2]
RELEASE, RELEASE_NAMESPACE = "layerlb", "layerlb-system"
BROKEN = "examples/invalid/engine-nftables-tunnel.yaml"
UDP = (
    'python3 -c "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); '
    "s.sendto(b'hello', ('{vip}', {port})); print(s.recv(200).decode())\""
)
# Every example this kernel can run, with what a client tries. Traffic through the host-network ones
# (transparent, nat) needs the backends' replies routed back through the forwarding node (they keep the
# client's address): shown Ready here, their traffic is proved by e2e/nodes/test_local_client_ip.py.
EXAMPLES: dict[str, list[str]] = {
    "l7-proxy-routes.yaml": [
        "curl -s -H 'Host: api.example.com' http://{vip}:8080/v1/items",
        "curl -s -H 'Host: api.example.com' -H 'X-Canary: true' http://{vip}:8080/v1/items",
        "curl -s -H 'Host: www.example.com' http://{vip}:8080/static/app.css",
    ],
    "l7-https.yaml": ["curl -sk --resolve shop.example.com:8443:{vip} https://shop.example.com:8443/"],
    "l4-proxy-tcp.yaml": ["curl -s http://{vip}:8080/"],
    "l4-proxy-udp.yaml": [UDP.replace("{port}", "5353")],
    "l7-transparent.yaml": [],
    "l4-nat-nftables.yaml": [],
}


@contextmanager
def step(what: str) -> Iterator[None]:
    print(f"\n\033[1m== {what}\033[0m", flush=True)
    started = time.monotonic()
    yield
    print(f"   ({time.monotonic() - started:.1f} s)", flush=True)


def run(line: str) -> None:
    print(f"$ {line}", flush=True)
    done = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=60, cwd=ROOT)
    print((done.stdout + done.stderr).rstrip() or f"(exit {done.returncode})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.nodes.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default="demo")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--once", action="store_true", help="stop after running the client commands")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    with step("building kubelet, kube-proxy, the control plane and helm from Go modules (first run only)"):
        local_cluster.ensure_binaries(with_nodes=True)
    with step("building the images without Docker: pause, layerlb (the Dockerfile's recipe), backend"):
        images = build.build_all()
    with step(
        f"starting the local cluster: control plane, scheduler, {args.nodes} nodes (containerd, kubelet, kube-proxy)"
    ):
        running = local_cluster.status(local_cluster.default_state_dir())
        cluster = local_cluster.up(
            local_cluster.default_state_dir(),
            nodes=args.nodes,
            images=[archive.path for archive in images.values()],
            progress=lambda message: print(f"   {message}", flush=True),
        )
        if running is not None and running.nodes:  # a cluster already running: give its nodes today's images
            for node in cluster.node_list():
                node_kit.import_images(node, [archive.path for archive in images.values()])
    platform = LocalNodes(cluster, image=images["layerlb"].reference, namespace=args.namespace)
    print(f"   export KUBECONFIG={cluster.kubeconfig}")
    print(kubectl(platform, "get", "nodes", "-o", "wide").rstrip())

    with step("installing the chart with Helm (CRDs, RBAC, the operator as a real pod)"):
        subprocess.run(
            ["kubectl", "create", "namespace", args.namespace],
            env=platform.env,
            capture_output=True,
            check=False,
        )
        for node in cluster.node_list():  # the image under the name the chart's defaults run
            node_kit.tag_image(node, images["layerlb"].reference, chart_default_image())
        installed = subprocess.run(
            ["helm", "status", RELEASE, "-n", RELEASE_NAMESPACE],
            env=platform.env,
            capture_output=True,
            check=False,
        )
        if installed.returncode != 0:
            install = harness.readme_command("install")
            print("$ " + " ".join(install))
            pods.helm(platform.env, *install[1:])
        pods.wait_ready(platform.env, RELEASE_NAMESPACE, f"app.kubernetes.io/instance={RELEASE}", timeout=180)
        print(kubectl(platform, "get", "pods", "-n", RELEASE_NAMESPACE, "-o", "wide").rstrip())

    with step("a broken resource: the CLI and the API server refuse it with the same message"):
        run(f".venv/bin/layerlb validate {BROKEN}")
        run(f"KUBECONFIG={cluster.kubeconfig} kubectl apply -f {BROKEN}")

    with step("backends b1-b3 and a client as pods of the layerlb image"):
        addresses = start_backends(platform)
    net = node_kit.client_netns(cluster.tag)
    try:
        with step(
            f"applying {len(EXAMPLES)} examples; waiting until each is Ready (forwarding pods on real nodes)"
        ):
            names = {file: apply_example(platform, file, addresses) for file in EXAMPLES}
            for name in names.values():
                pods.wait_ready(platform.env, args.namespace, f"layerlb.dev/loadbalancer={name}", timeout=300)
            kubectl(platform, "wait", "--for=condition=Ready", "--timeout=300s", "-n", args.namespace,
                    *[f"llb/{n}" for n in names.values()])  # fmt: skip
            print(kubectl(platform, "get", "llb", "-n", args.namespace).rstrip())
            print(kubectl(platform, "get", "pods", "-n", args.namespace, "-o", "wide").rstrip())
        print(
            "\n[demo] l4-nat-ipvs, l4-dsr and l4-tunnel are left out: IPVS and IP-in-IP are not in this kernel"
        )
        with step(f"client commands from the nodes' LAN (network namespace {net}; the speakers answer ARP)"):
            for file, tries in EXAMPLES.items():
                lb = json.loads(
                    kubectl(platform, "get", "llb", names[file], "-n", args.namespace, "-o", "json")
                )
                vip = lb["status"]["vip"]
                print(f"\n# {file} ({lb['spec']['mode']} {lb['spec']['architecture']}): VIP {vip}")
                if not tries:
                    print(
                        "(Ready; its traffic needs replies routed through the forwarding node, see the README)"
                    )
                for command in tries:
                    deadline = time.monotonic() + 30  # a new VIP: kube-proxy's rules and the speaker's answer
                    while True:
                        line = f"ip netns exec {net} {command.replace('{vip}', vip)}"
                        done = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=60)
                        if done.returncode == 0 or time.monotonic() > deadline:
                            break
                        time.sleep(0.5)
                    print(f"$ {line}\n{(done.stdout or done.stderr).rstrip() or f'(exit {done.returncode})'}")
        if not args.once:
            print("\n[demo] the VIPs keep serving; run the commands above from another shell. Ctrl-C stops.")
            sys.stdout.flush()
            stop.wait()
    finally:
        kubectl(platform, "delete", "llb", "--all", "-n", args.namespace, "--wait=true", "--timeout=120s")
    print(f"[demo] LoadBalancers removed; the cluster keeps running (KUBECONFIG={cluster.kubeconfig}); "
          "stop it with: make cluster-down")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

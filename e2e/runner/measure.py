"""`python -m e2e.runner.measure`: issue 5's latency targets, measured on a fresh local control plane.

- apply → Ready: `--count` LoadBalancers (the L4 TCP proxy example), applied one after another with
  `kubectl apply`, each timed until `kubectl wait --for=condition=Ready` returns; their forwarding pods
  are started by the pod runner.
- endpoint change → new Plan served: a Service-backed LoadBalancer whose EndpointSlice is changed
  `--changes` times; each change is timed until the forwarding pod's `/config` serves the new endpoint
  set (polled every 20 ms from the lab's router).

Prints p50, p95 and max of both. Needs root; takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from e2e.cluster import cluster
from e2e.harness import free_port, service_and_slice
from e2e.kube import kubectl_or_exit
from e2e.runner import lab
from e2e.runner.runner import PodRunner

ROOT = Path(__file__).resolve().parents[2]
NS = "measure"


def _summary(what: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return (
        f"{what}: n={len(ordered)} p50 {statistics.median(ordered):.2f} s, p95 {p95:.2f} s, "
        f"max {ordered[-1]:.2f} s"
    )


def _slice(addresses: list[str]) -> str:
    """The selector-less Service `app` (port 80 → 9001) with `addresses` as its endpoints."""
    return yaml.safe_dump_all(service_and_slice(NS, "app", addresses, 9001))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.runner.measure", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument(
        "--verbose", action="store_true", help="the runner's log (per-pod start and ready times)"
    )
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="runner: %(message)s", stream=sys.stderr)
    state = Path(tempfile.mkdtemp(prefix="layerlb-measure-"))
    running = cluster.up(state / "cluster")
    env = running.env()
    operator = None
    try:
        kubectl_or_exit(env, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        kubectl_or_exit(
            env,
            "wait",
            "--for=condition=Established",
            "crd/loadbalancers.layerlb.dev",
            "crd/vippools.layerlb.dev",
        )
        kubectl_or_exit(env, "create", "namespace", NS)
        metrics = f"127.0.0.1:{free_port()}"
        with (state / "operator.log").open("wb") as log:
            operator = subprocess.Popen(
                [sys.executable, "-m", "layerlb.cli", "operator", "--namespace", NS, "--metrics", metrics], env=env,
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        with PodRunner(running.kubeconfig, [NS], state / "runner") as runner:
            addresses = [host.address for host, _ in lab.start_backends(runner.lab)]
            kubectl_or_exit(env, "apply", "-f", "-", stdin=yaml.safe_dump(lab.vip_pool("measure", [NS])))
            ready: list[float] = []
            for index in range(args.count):
                documents = lab.adapt("l4-proxy-tcp.yaml", NS, addresses, f"m{index:02d}")
                started = time.monotonic()
                kubectl_or_exit(env, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
                kubectl_or_exit(
                    env, "wait", "--for=condition=Ready", "--timeout=120s", "-n", NS, f"llb/m{index:02d}"
                )
                ready.append(time.monotonic() - started)
            print(_summary("apply -> Ready", ready), flush=True)

            kubectl_or_exit(env, "apply", "-f", "-", stdin=_slice(addresses[:1]))
            backed = [{"name": "app", "service": {"name": "app", "port": 80}}]
            documents = lab.adapt("l4-proxy-tcp.yaml", NS, addresses, "svc", backends=backed)
            kubectl_or_exit(env, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
            kubectl_or_exit(env, "wait", "--for=condition=Ready", "--timeout=120s", "-n", NS, "llb/svc")
            [pod] = runner.pods_of("svc")
            url = f"http://{pod.host.address}:9090/config"
            changes: list[float] = []
            for index in range(args.changes):
                wanted = addresses[: 1 + (index + 1) % 3]
                started = time.monotonic()
                kubectl_or_exit(env, "apply", "-f", "-", stdin=_slice(wanted))
                while True:
                    served = runner.lab.router.run(["curl", "-s", url]).stdout
                    found = {a for a in addresses if f'"{a}"' in served}
                    if found == set(wanted):
                        break
                    if time.monotonic() - started > 30:
                        raise SystemExit(f"the Plan with {wanted} was not served within 30 s: {served[:500]}")
                    time.sleep(0.02)
                changes.append(time.monotonic() - started)
            print(_summary("endpoint change -> new Plan served", changes), flush=True)
            print(json.dumps({"apply_to_ready": ready, "endpoint_change": changes}))
        shutil.rmtree(state / "runner", ignore_errors=True)
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(30)
        cluster.down(state / "cluster")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

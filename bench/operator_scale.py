"""How the operator copes with many LoadBalancers: a cold start over N of them, timed, with its memory.

The target: 1,000 LoadBalancers (no forwarding pods started) reconciled from a cold operator start
in ≤ 60 s, operator RSS ≤ 300 MB. "Reconciled" means every LoadBalancer reports `Programmed=True` for its
current generation, which the operator writes only after all five owned objects were applied.

    python bench/operator_scale.py [--count 1000] [--cluster STATE_DIR]

It starts a throwaway local control plane (or reuses the one in `--cluster`), applies the LoadBalancers
while no operator runs, then starts `layerlb operator` and polls until all are Programmed. The figure is
wall-clock on this machine, so a busy machine reads slower; run it alone for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "scale"
BATCH = 200  # LoadBalancers per `kubectl apply` (one request body each; keeps bodies well under limits)


def load_balancer(index: int) -> dict[str, Any]:
    """An L4 proxy LoadBalancer with its own VIP and two static endpoints: resolvable without a Service."""
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": f"lb-{index:04d}", "namespace": NAMESPACE},
        "spec": {
            "mode": "L4",
            "architecture": "proxy",
            "vip": f"10.{100 + index // 65536}.{index // 256 % 256}.{index % 256}",
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
        },
    }


def programmed(listed: dict[str, Any]) -> int:
    """How many of the `kubectl get -o json` list's LoadBalancers report Programmed=True for their current
    generation."""
    count = 0
    for item in listed["items"]:
        generation = item["metadata"].get("generation")
        for c in (item.get("status") or {}).get("conditions") or []:
            if (
                c["type"] == "Programmed"
                and c["status"] == "True"
                and c.get("observedGeneration") == generation
            ):
                count += 1
    return count


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of `pid` in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000, help="LoadBalancers to create (default 1000)")
    parser.add_argument("--cluster", type=Path, help="state folder of a running local cluster to reuse")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from e2e.cluster.cluster import down, up
    from e2e.kube import kubectl_or_exit as kubectl

    state = args.cluster or Path(tempfile.mkdtemp(prefix="llb-scale-")) / "cluster"
    cluster = up(state)
    env = cluster.env()
    operator: subprocess.Popen[bytes] | None = None
    try:
        kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        kubectl(env, "wait", "--for=condition=Established", "--timeout=120s", "crd/loadbalancers.layerlb.dev")
        kubectl(env, "create", "namespace", NAMESPACE)
        started = time.monotonic()
        for first in range(0, args.count, BATCH):
            items = [load_balancer(i) for i in range(first, min(first + BATCH, args.count))]
            kubectl(
                env,
                "apply",
                "-f",
                "-",
                stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
            )
        print(
            f"applied {args.count} LoadBalancers in {time.monotonic() - started:.1f} s (no operator running)"
        )

        log = state.parent / "operator.log"
        with log.open("wb") as out:
            command = [sys.executable, "-m", "layerlb.cli", "operator", "--namespace", NAMESPACE]
            operator = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        started = time.monotonic()
        peak = 0.0
        done = 0
        while time.monotonic() - started < args.timeout:
            done = programmed(json.loads(kubectl(env, "get", "llb", "-n", NAMESPACE, "-o", "json")))
            peak = max(peak, rss_mb(operator.pid)[1])
            elapsed = time.monotonic() - started
            print(f"  {elapsed:6.1f} s  {done}/{args.count} Programmed  peak RSS {peak:.0f} MB", flush=True)
            if done == args.count:
                break
            if operator.poll() is not None:
                raise SystemExit(f"the operator exited ({operator.returncode}); see {log}")
            time.sleep(2)
        elapsed = time.monotonic() - started
        current, peak = rss_mb(operator.pid)
        verdict = "met" if done == args.count and elapsed <= 60 and peak <= 300 else "missed"
        print(
            f"cold start: {done}/{args.count} Programmed in {elapsed:.1f} s (target ≤ 60 s); operator RSS "
            f"{current:.0f} MB now, {peak:.0f} MB peak (target ≤ 300 MB): {verdict}"
        )
        return 0 if done == args.count else 1
    finally:
        if operator is not None and operator.poll() is None:
            operator.terminate()
            operator.wait(timeout=60)
        if args.cluster is None:
            down(state)
        os.sync()


if __name__ == "__main__":
    sys.exit(main())

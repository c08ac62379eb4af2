"""The speaker's "1,000 VIPs announced by one speaker within 10 s of its start, RSS ≤ 100 MB", in Kubernetes
mode: the speaker reads the API server as the chart's DaemonSet runs it, not a static file.

    .venv/bin/python -m bench.announce_kube [--vips 1000] [--runs 3]      (root; `make bench-announce-kube`)

Set-up, once: the local control plane (e2e/cluster/cluster.py, no kubelet nodes) with layerlb's CRDs;
three Node objects (node1..node3, Ready with their InternalIP written through the status subresource,
their node Leases renewed by this script as a kubelet would); N Services of type LoadBalancer with class
`layerlb.dev/loadbalancer`, externalTrafficPolicy Cluster (every Ready node is eligible), whose
`status.loadBalancer.ingress` this script writes itself (no operator: the speaker only reads, and the
allocator's own figure is `make bench-services`); and the speaker's ServiceAccount, ClusterRole and
binding as the chart renders them, its token in a kubeconfig. Each Service asks for an IPv6 ClusterIP
only: the local cluster's IPv4 Service range is a /24 and would run out at 254.

Each run starts ONE speaker, `layerlb speaker` with NODE_NAME=node1 and KUBECONFIG, in node1's network
namespace on the netns LAN (tests/kernel/speaker_lan.py: a bridge and a client namespace); node2 and
node3 exist as Nodes only, so node1 is the only live speaker and holds every VIP. The API server listens
on the host's loopback; node1 reaches it through a relay (socat: TCP 127.0.0.1:6443 in the namespace →
a unix socket → the API server), as the real nodes of e2e/cluster/nodes.py do. Measured per run:

- answered: from the speaker's start (just before its process is spawned) until the client has an ARP
  reply for every VIP (a prober in the client namespace, its own framing, every 200 ms for the VIPs not
  answered yet; as `bench.announce`), and until the speaker logs "holding N of N VIPs";
- a sample of VIPs (first, last and 8 others) checked with `arping` from the client: node1's MAC only;
- the speaker's RSS (VmRSS, VmHWM from /proc) and CPU seconds (utime + stime) when every VIP answers,
  and again once the speaker has posted its N `Announcing` Events (counted on the API server), the
  time that took, and the Events that were posted (a speaker that rate-limits them posts fewer).

Printed: each run, then p50/max over the runs. Targets: answered ≤ 10 s, RSS ≤ 100 MB. The cluster, the
namespaces and the processes are removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import ipaddress
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "llb-bench-announce"
SYSTEM_NAMESPACE = "llb-bench-speaker"
CLASS = "layerlb.dev/loadbalancer"
VIP_BASE = ipaddress.IPv4Address("10.0.52.0")
VIP_ROUTE = "10.0.52.0/22"
RELAY_PORT = 6443
SPEAKER_NODE = "node1"
TARGET_SECONDS, TARGET_MB = 10.0, 100.0
EVENTS_WAIT = 60.0  # s after the speaker's start
HELM = Path(os.environ.get("LAYERLB_CACHE") or ROOT / ".cache") / "k8s" / "bin" / "helm"
HOLDING = re.compile(r"^(\S+ \S+) layerlb-speaker: holding (\d+) of (\d+) VIPs")


def vips(count: int) -> list[str]:
    return [str(VIP_BASE + n) for n in range(1, count + 1)]


def proc(pid: int) -> tuple[float, float, float]:
    """VmRSS and VmHWM in MB, and CPU seconds (user + system) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024, cpu


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    from e2e.kube import kubectl_or_exit

    return kubectl_or_exit(env, *args, stdin=stdin)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the cluster's objects -----------------------------------------------------------------------------


def node(name: str, address: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"bench": "announce"}}}


def node_status(address: str) -> dict[str, Any]:
    stamp = now_text()
    return {
        "status": {
            "addresses": [{"type": "InternalIP", "address": address}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "bench.announce_kube plays the kubelet",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ],
        }
    }


def service(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"vip-{index:04d}", "namespace": NAMESPACE},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "allocateLoadBalancerNodePorts": False,
            "ipFamilies": ["IPv6"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{"port": 80, "targetPort": 8080}],
        },
    }


class Leases(threading.Thread):
    """Renews the nodes' Leases in kube-node-lease every 10 s, so the node lifecycle controller keeps them
    Ready without a kubelet."""

    def __init__(self, coordination: Any, names: list[str]) -> None:
        super().__init__(name="node-leases", daemon=True)
        self.coordination, self.names = coordination, names
        self.stop = threading.Event()

    def body(self, name: str) -> dict[str, Any]:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": stamp},
        }

    def renew(self) -> None:
        for name in self.names:
            try:
                self.coordination.patch_namespaced_lease(name, "kube-node-lease", self.body(name))
            except Exception:
                self.coordination.create_namespaced_lease("kube-node-lease", self.body(name))

    def run(self) -> None:
        while not self.stop.wait(10.0):
            try:
                self.renew()
            except Exception as error:
                print(f"[announce-kube] node lease: {error}", file=sys.stderr)


def speaker_kubeconfig(env: dict[str, str], admin: Path, folder: Path) -> Path:
    """The chart's speaker ServiceAccount, ClusterRole and binding (helm template), and a kubeconfig with the
    account's token whose server is the relay inside node1's namespace."""
    rendered = subprocess.run(
        [str(HELM), "template", "llb", str(ROOT / "charts" / "layerlb"), "--namespace", SYSTEM_NAMESPACE,
         "--show-only", "templates/speaker.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    wanted = [
        doc
        for doc in yaml.safe_load_all(rendered)
        if doc and doc["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
    ]
    account = next(doc["metadata"]["name"] for doc in wanted if doc["kind"] == "ServiceAccount")
    kubectl(env, "apply", "-f", "-", stdin=yaml.safe_dump_all(wanted))
    token = kubectl(env, "create", "token", account, "-n", SYSTEM_NAMESPACE, "--duration=2h").strip()
    from e2e import harness

    cluster = yaml.safe_load(admin.read_text())["clusters"][0]["cluster"]
    relayed = {**cluster, "server": f"https://127.0.0.1:{RELAY_PORT}"}
    return harness.token_kubeconfig(folder / "speaker.kubeconfig", relayed, "speaker", token)


def populate(core: Any, count: int, addresses: dict[str, str]) -> None:
    """Nodes (Ready, InternalIP) and `count` Services with their ingress written, 8 requests at a time."""
    for name, address in addresses.items():
        core.create_node(node(name, address))
        core.patch_node_status(name, node_status(address))

    def one(index: int, vip: str) -> None:
        core.create_namespaced_service(NAMESPACE, service(index))
        status = {"status": {"loadBalancer": {"ingress": [{"ip": vip, "ipMode": "VIP"}]}}}
        core.patch_namespaced_service_status(f"vip-{index:04d}", NAMESPACE, status)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count), vips(count)))


def clear_conditions(core: Any, count: int) -> None:
    """Removes the conditions an earlier run's speaker wrote, so that every run is a first start (the
    speaker writes its 1,000 statuses again), not a restart that finds them written."""

    def one(index: int) -> None:
        patch = {"status": {"conditions": None}}
        core.patch_namespaced_service_status(f"vip-{index:04d}", NAMESPACE, patch)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def count_events(core: Any) -> int:
    response = core.list_namespaced_event(
        NAMESPACE, field_selector="reason=Announcing", _preload_content=False
    )
    return len(json.loads(response.data).get("items") or [])


# --- one run ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    answered: float  # s from start until the client has a reply for every VIP
    holding: float  # s from start until the log says "holding N of N VIPs"
    answered_count: int
    rss: float
    hwm: float
    cpu: float
    events_after: float  # s from start until the Announcing Events were on the API server (or the wait ended)
    events: int
    rss_settled: float
    hwm_settled: float
    cpu_settled: float


def holding_time(stderr: str, count: int) -> float | None:
    """Wall-clock time (local, as logging's asctime) of the first "holding N of N VIPs" line with N = count."""
    for line in stderr.splitlines():
        match = HOLDING.match(line)
        if match and int(match.group(2)) == count == int(match.group(3)):
            return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def one_run(
    network: Any,
    core: Any,
    kubeconfig: Path,
    count: int,
    extra: list[str],
    log: Path | None,
    source: Path | None,
) -> Run:
    from tests.kernel.speaker_lan import TIMING, wait_until

    targets = vips(count)
    clear_conditions(core, count)
    core.delete_collection_namespaced_event(NAMESPACE)
    wait_until("old Events gone", lambda: count_events(core) == 0, timeout=30, every=0.2)

    from tests.kernel import speaker_lan  # the client's own ARP requests, framed there

    prober = network.client.spawn(speaker_lan.probe_all, "eth0", targets, time.time() + 60)
    prober.wait_for_line("probing")
    argv = ["env", f"NODE_NAME={SPEAKER_NODE}", f"KUBECONFIG={kubeconfig}"]
    if source is not None:  # another checkout's speaker (a before/after comparison)
        paths = [source, source / "operator", source / "dataplane", source / "speaker"]
        argv.append("PYTHONPATH=" + os.pathsep.join(map(str, paths)))
    argv += [sys.executable, "-m"]
    argv += ["layerlb.cli", "speaker", *TIMING, *extra]
    started = time.time()
    speaker = network.nodes[SPEAKER_NODE].popen(argv, what=f"speaker {SPEAKER_NODE}")
    try:
        _, last_text, answered_text = prober.wait_for_line("answered", timeout=90).split()
        rss, hwm, cpu = proc(speaker.pid)
        held = wait_until("holding every VIP", lambda: holding_time(speaker.stderr(), count), timeout=30)
        events = 0
        while time.time() < started + EVENTS_WAIT:
            events = count_events(core)
            if events >= count:
                break
            time.sleep(0.1)
        events_after = time.time() - started
        rss_settled, hwm_settled, cpu_settled = proc(speaker.pid)
        sample = [targets[0], targets[-1], *random.sample(targets[1:-1], min(8, max(0, count - 2)))]
        for vip in sample:
            macs = network.arping(vip, count=1)
            assert macs == {network.macs[SPEAKER_NODE]}, f"arping {vip}: {macs}"
    finally:
        if log is not None:
            log.write_text(speaker.stderr())
        speaker.stop()
        prober.stop()
    return Run(
        float(last_text) - started,
        held - started,
        int(answered_text),
        rss,
        hwm,
        cpu,
        events_after,
        events,
        rss_settled,
        hwm_settled,
        cpu_settled,
    )


def summary(what: str, values: list[float], unit: str) -> str:
    return f"{what}: p50 {statistics.median(values):.2f} {unit}, max {max(values):.2f} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.announce_kube",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vips", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--speaker-args", default="", help="extra speaker options")
    parser.add_argument(
        "--source", type=Path, help="run the speaker of this checkout (e.g. a git worktree of HEAD)"
    )
    parser.add_argument("--logs", type=Path, help="keep each run's speaker log in this folder")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.announce_kube: needs root (network namespaces)", file=sys.stderr)
        return 2
    sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "dataplane"), str(ROOT / "speaker")]

    import layerlb_speaker
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config_module

    from e2e.cluster import cluster as cluster_kit
    from tests.kernel import speaker_lan
    from tests.kernel.speaker_lan import NODES

    where = args.source / "speaker" if args.source else Path(layerlb_speaker.__file__).parent.parent
    print(f"[announce-kube] speaker from {where}; load {load_average()}")
    workdir = Path(tempfile.mkdtemp(prefix="llb-bench-announce-kube-"))
    began = time.monotonic()
    cluster = cluster_kit.up(workdir / "cluster")
    env = cluster.env()
    leases: Leases | None = None
    relay: subprocess.Popen[bytes] | None = None
    runs: list[Run] = []
    try:
        kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        kubectl(env, "wait", "--for=condition=Established", "--timeout=120s", "crd/vippools.layerlb.dev")
        kubectl(env, "wait", "--for=condition=Established", "--timeout=120s", "crd/loadbalancers.layerlb.dev")
        kubectl(env, "create", "namespace", NAMESPACE)
        kubectl(env, "create", "namespace", SYSTEM_NAMESPACE)
        kubeconfig = speaker_kubeconfig(env, cluster.kubeconfig, workdir)
        loaders: Any = k8s_config_module  # untyped
        api = loaders.new_client_from_config(config_file=str(cluster.kubeconfig))
        api.configuration.connection_pool_maxsize = 8
        core = k8s.CoreV1Api(api)
        populate(core, args.vips, dict(NODES))
        leases = Leases(k8s.CoordinationV1Api(api), list(NODES))
        leases.renew()
        leases.start()
        print(
            f"[announce-kube] control plane, 3 Nodes and {args.vips} Services with their ingress in "
            f"{time.monotonic() - began:.1f} s"
        )
        socket_path = workdir / "api.sock"
        relay = subprocess.Popen(
            ["socat", f"UNIX-LISTEN:{socket_path},fork,unlink-early,mode=600", f"TCP:127.0.0.1:{cluster.server.rsplit(':', 1)[1]}"],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        with speaker_lan.lan(workdir, nodes=1) as network:
            network.client.ip("route", "add", VIP_ROUTE, "dev", "eth0")  # the VIPs' subnet is on the LAN
            network.nodes[SPEAKER_NODE].popen(
                ["socat", f"TCP-LISTEN:{RELAY_PORT},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{socket_path}"],
                what="API relay",
            )  # fmt: skip
            speaker_lan.wait_until("the relay", socket_path.exists, timeout=10)
            time.sleep(0.3)  # the relay's listener in the namespace
            for number in range(1, args.runs + 1):
                log = None
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    log = args.logs / f"speaker-{number}.log"
                run = one_run(
                    network, core, kubeconfig, args.vips, args.speaker_args.split(), log, args.source
                )
                runs.append(run)
                print(
                    f"run {number}: {run.answered_count}/{args.vips} VIPs answered {run.answered:.2f} s after the "
                    f"speaker's start (log 'holding {args.vips} of {args.vips}' at {run.holding:.2f} s); "
                    f"RSS {run.rss:.1f} MB, peak {run.hwm:.1f} MB, CPU {run.cpu:.2f} s; "
                    f"{run.events} Announcing Events by {run.events_after:.1f} s: then RSS {run.rss_settled:.1f} MB, "
                    f"peak {run.hwm_settled:.1f} MB, CPU {run.cpu_settled:.2f} s; load {load_average()}",
                    flush=True,
                )
        print(f"over {len(runs)} runs ({args.vips} VIPs, Kubernetes mode, one speaker):")
        print(
            summary("  answered after start", [r.answered for r in runs], "s")
            + f" (target ≤ {TARGET_SECONDS:.0f} s)"
        )
        print(summary("  'holding N of N' after start", [r.holding for r in runs], "s"))
        print(
            summary("  VmRSS when answered", [r.rss for r in runs], "MB") + f" (target ≤ {TARGET_MB:.0f} MB)"
        )
        print(summary("  VmHWM when answered", [r.hwm for r in runs], "MB"))
        print(summary("  CPU when answered", [r.cpu for r in runs], "s"))
        print(summary("  Events on the API server after", [r.events_after for r in runs], "s"))
        print(
            summary("  VmRSS / VmHWM settled", [r.rss_settled for r in runs], "MB")
            + f" / max peak {max(r.hwm_settled for r in runs):.1f} MB"
        )
        print(summary("  CPU settled", [r.cpu_settled for r in runs], "s"))
        met = all(
            r.answered_count == args.vips and r.answered <= TARGET_SECONDS and r.hwm_settled <= TARGET_MB
            for r in runs
        )
        print(f"target {'met' if met else 'missed'}")
        return 0 if met else 1
    finally:
        if leases is not None:
            leases.stop.set()
        if relay is not None:
            relay.terminate()
            relay.wait(10)
        cluster_kit.down(cluster.state_dir)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""Data-plane faults under traffic on real nodes (#18, point 2), each counted by an independent client.

`e2e/nodes/load.py` keeps `WORKERS` HTTP/1.1 connections busy and writes down every request (start, end,
outcome, the forwarding pod that answered) on the host's monotonic clock, which the test shares: the
fault's instant and the requests are on one axis.

- A forwarding pod SIGKILLed under load, replicas 2, the client in the cluster (kube-proxy spreads its
  connections over both pods): of the requests sent to a pod, only those in flight on the killed one when
  it died fail (at most `WORKERS`; a kept-alive connection to the dead pod costs its current request only,
  the client resends a GET whose reused connection closed, as common clients do); the pod comes back Ready
  and serves again, and nothing fails from then on. A new connection that kube-proxy still sends to the
  dead pod's address before its endpoint leaves the VIP Service is refused (nothing was sent): counted
  and reported with that window, and allowed only until the pod is back Ready: layerlb cannot answer for
  a SIGKILLed process; the platform's endpoint removal bounds it.
- The node announcing the VIP lost (its LAN link cut, as a pulled cable or a dead switch port: its
  speaker's heartbeats, its ARP answers and its pods are gone from the LAN): the other node announces the
  VIP within the speaker's dead-after bound (`maxDeadAfter` 2 s, plus a busy machine's slack), the LAN
  client's failures are bounded by one per worker per client timeout while the VIP moves, and none once
  it has moved; when the link returns, the VIP stays where it is (it moves only when its holder is lost).
- The VIP holder's forwarding pod SIGKILLed under load from the LAN client (externalTrafficPolicy Local:
  the holder's node sends the VIP to its own pod only): its requests fail until the pod is seen not Ready
  and the VIP moves to the other node (`KILL_MOVE_BOUND`), none after: the price of Local (the client
  address kept, no second hop) is that the holder's node has no other pod to send new connections to.

The figures are printed (`-s`); local platform only (the nodes' network namespaces and the LAN client).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import examples, harness
from e2e.cluster import nodes as node_kit
from e2e.nodes import pods
from e2e.nodes.chart_operator import RELEASE_NS
from e2e.nodes.platform import KIND_ENV, LocalNodes, Platform
from e2e.nodes.suite import call, deploy, kubectl, pod
from e2e.nodes.test_announcement import SPEAKERS, Lan, lan

__all__ = ["lan"]  # the LAN fixture (backends, the nodes' MACs, speakers Ready), shared

pytestmark = pytest.mark.skipif(bool(os.environ.get(KIND_ENV)), reason="the local nodes' namespaces")

LOAD = Path(__file__).with_name("load.py")
WORKERS = 8
# The chart's speaker.maxDeadAfter: a silent peer is dead after at most this long.
MAX_DEAD_AFTER = 2.0
# What a busy 2-core machine adds to it: the surviving speaker's check round, its gratuitous ARP, and
# scheduling delays of the speaker and the client (the speaker-kill test in test_announcement allows 5 s).
MOVE_SLACK = 3.0
# A SIGKILLed forwarding pod's VIP moves once the pod is seen not Ready: the kubelet notices the exit (its
# pod lifecycle relist, every second), writes the pod's status, the speakers' watch sees it; measured 2-4 s.
KILL_MOVE_BOUND = 10.0


@dataclass
class Load:
    """`load.py` running somewhere (`argv`); `records` fills as its requests end."""

    argv: list[str]
    stop: Path | None  # a stop file this process can create, or None to create it with `stop_command`
    stop_command: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(LOAD.read_text())
        self.process.stdin.close()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self.records.append(json.loads(line))

    def answered_by(self, peer: str, since: float = 0.0) -> bool:
        return any(r["ok"] and r["peer"] == peer and r["start"] >= since for r in list(self.records))

    def finish(self) -> list[dict[str, Any]]:
        if self.stop is not None:
            self.stop.touch()
        else:
            subprocess.run(self.stop_command, env=self.env, check=False, capture_output=True, timeout=60)
        try:
            self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(30)
        self.reader.join(30)
        assert self.process.stderr is not None
        errors = self.process.stderr.read()
        assert self.records, f"the load client recorded nothing: {errors}"
        return sorted(self.records, key=lambda r: float(r["start"]))


@contextlib.contextmanager
def load_from_client_pod(platform: Platform, vip: str, port: int, tag: str) -> Iterator[Load]:
    """The load client in the suite's client pod (a pod of the cluster: kube-proxy sends its connections
    to the VIP to every forwarding pod, not only the announcing node's)."""
    stop = f"/tmp/stop-{tag}"
    exec_ = ["kubectl", "exec", "-i", "-n", platform.namespace, "client", "--"]
    load = Load(
        [*exec_, "python3", "-", vip, str(port), stop, "--workers", str(WORKERS), "--recycle", "50"],
        stop=None,
        stop_command=[*exec_, "touch", stop],
        env=platform.env,
    )
    try:
        yield load
    finally:
        if load.process.poll() is None:
            load.finish()


@contextlib.contextmanager
def load_from_lan(local: LocalNodes, vip: str, port: int, stop: Path, timeout: float) -> Iterator[Load]:
    """The load client in the LAN client's network namespace (outside the cluster, finding the VIP by ARP)."""
    netns = f"--net=/run/netns/{node_kit.client_netns(local.cluster.tag)}"
    argv = ["nsenter", netns, "python3", "-", vip, str(port), str(stop)]
    load = Load([*argv, "--workers", str(WORKERS), "--timeout", str(timeout)], stop=stop)
    try:
        yield load
    finally:
        if load.process.poll() is None:
            load.finish()


def _dataplane_pid(local: LocalNodes, forwarding_pod: dict[str, Any]) -> int:
    """The `layerlb dataplane` process of a forwarding pod: the one in the pod's network namespace."""
    address = forwarding_pod["status"]["podIP"]
    for entry in sorted(Path("/run/netns").glob("cni-*")):
        listed = subprocess.run(
            ["ip", "-n", entry.name, "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=30
        )
        links = json.loads(listed.stdout or "[]") if listed.returncode == 0 else []
        if any(a.get("local") == address for link in links for a in link.get("addr_info", [])):
            inode = os.stat(entry).st_ino
            break
    else:
        raise AssertionError(f"no network namespace holds {address}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            if os.stat(proc / "ns" / "net").st_ino != inode:
                continue
        except OSError:
            continue
        if b"dataplane" in command and any(part.endswith(b"layerlb") for part in command):
            return int(proc.name)
    raise AssertionError(f"no layerlb dataplane process in {forwarding_pod['metadata']['name']}")


def _forwarding_pods(platform: Platform, name: str) -> list[dict[str, Any]]:
    listed = kubectl(
        platform,
        "get",
        "pods",
        "-n",
        platform.namespace,
        "-l",
        f"layerlb.dev/loadbalancer={name}",
        "-o",
        "json",
    )
    found: list[dict[str, Any]] = json.loads(listed)["items"]
    return found


def _ready(found: dict[str, Any]) -> bool:
    conditions = (found.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _figures(records: list[dict[str, Any]], since: float, until: float) -> str:
    window = [r for r in records if since <= r["start"] < until]
    per_second = len(window) / max(until - since, 1e-6)
    return f"{len(records)} requests, {per_second:.0f}/s before the fault"


def test_a_forwarding_pod_killed_under_load_fails_only_its_in_flight_requests(lan: Lan) -> None:
    local = lan.local
    lb = deploy(local, "l7-proxy-routes.yaml", lan.addresses, name="chaos-kill", replicas=2)
    name, vip = lb["metadata"]["name"], lb["status"]["vip"]
    forwarding = pods.wait_ready(local.env, local.namespace, f"layerlb.dev/loadbalancer={name}", count=2)
    addresses = {p["status"]["podIP"]: p for p in forwarding}
    try:
        with load_from_client_pod(local, vip, 8080, "chaos-kill") as load:
            started = time.monotonic()
            harness.wait_for(
                "the client's connections answered by both forwarding pods",
                lambda: all(load.answered_by(address) for address in addresses),
                timeout=120,
            )
            victim_address = sorted(addresses)[0]
            victim = addresses[victim_address]
            pid = _dataplane_pid(local, victim)
            assert _endpoint_ready(local, name, victim_address)
            dropped: float | None = None  # when its endpoint was seen leaving the VIP Service
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)

            def back() -> bool:
                nonlocal dropped
                if dropped is None and not _endpoint_ready(local, name, victim_address):
                    dropped = time.monotonic()
                now = {p["metadata"]["uid"]: p for p in _forwarding_pods(local, name)}
                live = [p for p in now.values() if not p["metadata"].get("deletionTimestamp")]
                restarted = (
                    any(
                        p["metadata"]["uid"] == victim["metadata"]["uid"]
                        and p["status"]["containerStatuses"][0]["restartCount"] >= 1
                        for p in live
                    )
                    or victim["metadata"]["uid"] not in now
                )
                return restarted and len(live) == 2 and all(_ready(p) for p in live)

            harness.wait_for(f"{name}'s killed pod back (or replaced) and both Ready", back, timeout=180)
            recovered = time.monotonic()
            # The client's kept-alive connections all went to the surviving pod: new ones reach both again.
            replacement = {p["status"]["podIP"] for p in _forwarding_pods(local, name)}
            harness.wait_for(
                "new connections answered by both pods again",
                lambda: (
                    replacement
                    <= set(re.findall(r"from=(\S+)", " ".join(call(local, "http_get", vip, 8080, 6))))
                ),
                timeout=120,
            )
        records = load.finish()
    finally:
        kubectl(local, "delete", "llb", name, "-n", local.namespace, "--wait=true", "--timeout=120s")
    failed = [r for r in records if not r["ok"]]
    # In flight on the killed pod when it died: sent before the kill, not answered by then, on a connection
    # to that pod (or a new one whose pod nobody knows yet).
    in_flight = [
        r for r in records if r["start"] <= killed < r["end"] and r["peer"] in (victim_address, None)
    ]
    # A new connection kube-proxy still sent to the dead pod's address (nothing listens there any more) until
    # the endpoint left the EndpointSlice: refused, nothing sent. Not layerlb's to prevent after a SIGKILL.
    refused = [r for r in failed if r["fresh"] and str(r["error"]).startswith("ConnectionRefusedError")]
    reached = [r for r in failed if r not in refused]
    retried = [r for r in records if r["retried"]]
    window = f"{dropped - killed:.1f} s" if dropped is not None else "not seen"
    print(
        f"\nforwarding pod {victim['metadata']['name']} ({victim_address}) SIGKILLed under load "
        f"({WORKERS} connections; {_figures(records, started, killed)}): {len(failed)} failed: "
        f"{len(reached)} sent to it, of {len(in_flight)} in flight on it, and {len(refused)} new connections "
        f"refused at its address (it left the EndpointSlice after {window}); {len(retried)} resent after a "
        f"reused connection closed; back Ready after {recovered - killed:.1f} s"
    )

    def shown(found: list[dict[str, Any]]) -> list[tuple[float, float, str | None, str]]:
        return [
            (round(r["start"] - killed, 3), round(r["end"] - killed, 3), r["peer"], r["error"]) for r in found
        ]

    assert all(r in in_flight for r in reached) and len(in_flight) <= WORKERS, shown(reached)
    assert all(killed <= r["start"] <= recovered for r in refused), shown(refused)
    assert not [r for r in failed if r["start"] > recovered], shown(failed)
    assert len(records) > 20 * WORKERS, "the load did not run throughout"


def _endpoint_ready(platform: Platform, name: str, address: str) -> bool:
    """Whether the forwarding pod at `address` is a ready endpoint of the LoadBalancer's VIP Service."""
    listed = kubectl(
        platform, "get", "endpointslices", "-n", platform.namespace,
        "-l", f"kubernetes.io/service-name={name}-dataplane", "-o", "json",
    )  # fmt: skip
    return any(
        address in endpoint.get("addresses", []) and (endpoint.get("conditions") or {}).get("ready")
        for item in json.loads(listed)["items"]
        for endpoint in item.get("endpoints") or []
    )


@pytest.fixture
def pinned_backends(lan: Lan) -> Iterator[dict[str, str]]:
    """A backend pod on each node (node name → its address): a lost node takes its backends with it, and
    the test must know which survive."""
    local = lan.local
    manifests = []
    for node in local.cluster.node_list():
        command = ["python3", "/scripts/backends.py", "--name", f"on-{node.name}", "--host", "0.0.0.0"]
        command += [f"--http={port}" for port in examples.HTTP_PORTS]  # every port the example's backends use
        manifest = pod(local, f"chaos-{node.name}", command, {"app": "chaos-backend"}, 9001)
        manifest["spec"]["nodeName"] = node.name
        manifests.append(manifest)
    kubectl(local, "apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
    try:
        found = pods.wait_ready(local.env, local.namespace, "app=chaos-backend", count=len(manifests))
        yield {p["spec"]["nodeName"]: p["status"]["podIP"] for p in found}
    finally:
        kubectl(local, "delete", "pod", "-l", "app=chaos-backend", "-n", local.namespace, "--wait=false")


def test_losing_the_node_that_announces_the_vip_moves_it_within_the_dead_after_bound(
    lan: Lan, pinned_backends: dict[str, str], tmp_path: Path
) -> None:
    local = lan.local
    timeout = 1.0  # the LAN client's per-request timeout: one failure per worker per second of outage
    lb = deploy(local, "l7-proxy-routes.yaml", list(pinned_backends.values()), name="chaos-node", replicas=2)
    name, vip = lb["metadata"]["name"], lb["status"]["vip"]
    harness.wait_for("a forwarding pod on each node", lambda: len(lan.pod_nodes(name)) == len(lan.macs), 120)
    holder = lan.announcer(vip)
    [other] = set(lan.macs) - {holder}
    # Only the surviving node's backend: the lost node's would cost connect timeouts that are not the move's.
    deploy(local, "l7-proxy-routes.yaml", [pinned_backends[other]], name=name, replicas=2)
    lan.answer(vip, 8080)
    bridge = node_kit.network_netns(local.cluster.tag)
    cut = False
    try:
        with load_from_lan(local, vip, 8080, tmp_path / "stop", timeout) as load:
            started = time.monotonic()
            harness.wait_for(
                "the LAN client served through the VIP",
                lambda: sum(r["ok"] for r in load.records) >= 10 * WORKERS,
                timeout=120,
            )
            lost = time.monotonic()
            node_kit.ip("link", "set", holder, "down", netns=bridge)  # the node's port on the LAN switch
            cut = True
            moved = harness.wait_for(
                f"the LAN client's neighbour cache to point {vip} at {other}",
                lambda: time.monotonic() - lost if _neighbour(lan, vip) == lan.macs[other] else None,
                timeout=60,
                every=0.02,
            )
            settled = lost + moved + timeout
            harness.wait_for(
                "requests served after the move",
                lambda: sum(r["ok"] for r in load.records if r["start"] > settled) >= 10 * WORKERS,
                timeout=120,
            )
        records = load.finish()
        node_kit.ip("link", "set", holder, "up", netns=bridge)
        cut = False
        # The old holder is back: it must not take the VIP back (a move costs connections); one node answers.
        pods.wait_ready(local.env, RELEASE_NS, SPEAKERS, count=len(lan.macs))
        stays = lan.announcer(vip)
    finally:
        if cut:
            node_kit.ip("link", "set", holder, "up", netns=bridge)
        kubectl(local, "delete", "llb", name, "-n", local.namespace, "--wait=true", "--timeout=120s")
    failed = [r for r in records if not r["ok"]]
    late = [r for r in failed if r["start"] > settled]
    # A worker fails at most once per client timeout while the VIP is unreachable, plus the request it had
    # in flight when the node went: the bound for the move that was measured.
    bound = WORKERS * (math.ceil(moved / timeout) + 1)
    print(
        f"\n{holder} lost (LAN link cut) under load ({WORKERS} connections, client timeout {timeout:.0f} s; "
        f"{_figures(records, started, lost)}): the LAN client's neighbour cache pointed at {other} after "
        f"{moved:.2f} s; {len(failed)} requests failed (bound {bound}), {len(late)} after the move; "
        f"after the link returned the VIP is on {stays}"
    )
    assert moved < MAX_DEAD_AFTER + MOVE_SLACK, f"the VIP moved only after {moved:.2f} s"
    assert len(failed) <= bound, [(round(r["start"] - lost, 2), r["error"]) for r in failed]
    assert not late, [(round(r["start"] - lost, 2), r["error"]) for r in late]
    assert stays == other, f"the VIP went back to {holder} when it returned"


def test_killing_the_announcing_nodes_forwarding_pod_fails_lan_requests_only_until_the_vip_moves(
    lan: Lan, tmp_path: Path
) -> None:
    local = lan.local
    timeout = 1.0
    lb = deploy(local, "l7-proxy-routes.yaml", lan.addresses, name="chaos-lan-kill", replicas=2)
    name, vip = lb["metadata"]["name"], lb["status"]["vip"]
    harness.wait_for("a forwarding pod on each node", lambda: len(lan.pod_nodes(name)) == len(lan.macs), 120)
    holder = lan.announcer(vip)
    [other] = set(lan.macs) - {holder}
    [victim] = [p for p in _forwarding_pods(local, name) if p["spec"]["nodeName"] == holder]
    lan.answer(vip, 8080)
    try:
        with load_from_lan(local, vip, 8080, tmp_path / "stop", timeout) as load:
            started = time.monotonic()
            harness.wait_for(
                "the LAN client served through the VIP",
                lambda: sum(r["ok"] for r in load.records) >= 10 * WORKERS,
                timeout=120,
            )
            pid = _dataplane_pid(local, victim)
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            moved = harness.wait_for(
                f"the LAN client's neighbour cache to point {vip} at {other}",
                lambda: time.monotonic() - killed if _neighbour(lan, vip) == lan.macs[other] else None,
                timeout=60,
                every=0.02,
            )
            settled = killed + moved + timeout
            harness.wait_for(
                "requests served after the move",
                lambda: sum(r["ok"] for r in load.records if r["start"] > settled) >= 10 * WORKERS,
                timeout=120,
            )
        records = load.finish()
    finally:
        kubectl(local, "delete", "llb", name, "-n", local.namespace, "--wait=true", "--timeout=120s")
    failed = [r for r in records if not r["ok"]]
    late = [r for r in failed if r["start"] > settled]
    print(
        f"\nforwarding pod on {holder}, the VIP's holder, SIGKILLed under LAN load ({WORKERS} connections, "
        f"client timeout {timeout:.0f} s; {_figures(records, started, killed)}): the VIP moved to {other} "
        f"after {moved:.2f} s; {len(failed)} requests failed meanwhile, {len(late)} after"
    )
    # The holder's node keeps the VIP until its pod is seen not Ready (kube-proxy sends the VIP to local pods
    # only: externalTrafficPolicy Local), so its new connections fail until then: bounded by the move.
    assert moved < KILL_MOVE_BOUND, f"the VIP moved only after {moved:.2f} s"
    assert not late, [(round(r["start"] - killed, 2), r["error"]) for r in late]


def _neighbour(lan: Lan, vip: str) -> str | None:
    """The LAN client kernel's neighbour-cache MAC for `vip`, or None."""
    entries = json.loads(lan.local.client_exec("ip", "-j", "neigh", "show", vip, "dev", "eth0") or "[]")
    return next((str(e["lladdr"]).lower() for e in entries if e.get("lladdr")), None)

"""The ECMP lab (`ecmp_lab`) inside the QEMU guest, so the IPVS engine's `dsr` and `tunnel` are measured
with real packets: four LB nodes each run an `IpvsEngine`, a router spreads the VIP over three of them by a
multipath route, 100 long-lived connections run while a 4th node joins and then one leaves.

    python -m tests.kernel.guest_ecmp RESULT.json

One boot, several runs on one topology (findings: one `ecmp_lab.summary` per run, plus what the kernels
held):
- `dsr`, `tunnel`: the engine as shipped (Maglev with mh-port, sloppy_tcp). The joining node n4 saw its
  backend set grow (be1, be3, then be2 added), so it proves the engine's ordering of the real servers too.
- the negative controls, each on the joining node n4 only: `dsr, n4 rr` (scheduled round-robin, as
  before dsr hashed flows: a moved flow goes to any backend) and `dsr, n4 not sloppy` (sloppy_tcp off:
  the kernel default, a moved flow's packets are dropped).
- `nat`: masquerading real servers behind IPVS NAT (`net.ipv4.vs.conntrack=1` and an nftables masquerade,
  as kube-proxy does, so replies return to the node that translated), Maglev and sloppy_tcp set as for
  dsr: how far nat goes.

Same conventions as `guest_scenarios`: one process, servers and the client as threads inside their
namespaces, findings as plain values, no assertion here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any
from unittest import mock

from layerlb_dataplane.kernel.ipvs import engine as ipvs_engine

from layerlb import api, plan
from layerlb.render import ipvs_rules
from tests.kernel import ecmp_lab as lab
from tests.kernel.guest_scenarios import LB, ip_batch, make_plan, netns, record, run, sysctls, targets_of

COUNT, INTERVAL, TIMEOUT = 100, 0.3, 5.0  # emulation is slow: a line every 300 ms, 5 s without answer
SETTLE = TIMEOUT + 2.0
MASQUERADE = f"""table ip ecmp_masq {{
	chain post {{
		type nat hook postrouting priority srcnat; policy accept;
		ip daddr {{ {", ".join(lab.BACKENDS.values())} }} tcp dport {lab.PORT} masquerade
	}}
}}
"""
Findings = dict[str, Any]


def topology() -> None:
    """client -- router -- sw/br0 -- n1..n4, be1..be3 (VIP on lo, tunl0 up, arp_ignore, no rp_filter)."""
    members = [*lab.NODES, *lab.BACKENDS]
    ip_batch(
        ["netns add sw", *(f"netns add {n}" for n in ("client", "router", *members))]
        + [
            "link add eth0 netns client type veth peer name eth0 netns router",
            "link add lan netns router type veth peer name p-router netns sw",
        ]
        + [f"link add eth0 netns {n} type veth peer name p-{n} netns sw" for n in members]
    )
    ports = ["p-router", *(f"p-{n}" for n in members)]
    ip_batch(
        [
            "link add br0 type bridge",
            "link set br0 up",
            *(f"link set {p} master br0" for p in ports),
            *(f"link set {p} up" for p in ports),
        ],
        "sw",
    )
    ip_batch(
        [
            "link set lo up",
            "link set eth0 up",
            f"addr add {lab.CLIENT}/24 dev eth0",
            f"route add default via {lab.ROUTER_FRONT}",
        ],
        "client",
    )
    ip_batch(
        [
            "link set lo up",
            "link set eth0 up",
            "link set lan up",
            f"addr add {lab.ROUTER_FRONT}/24 dev eth0",
            f"addr add {lab.ROUTER_LAN}/24 dev lan",
        ],
        "router",
    )
    sysctls("router", lab.ROUTER_SYSCTLS)
    for name, address in {**lab.NODES, **lab.BACKENDS}.items():
        lines = ["link set lo up", "link set eth0 up", f"addr add {address}/24 dev eth0"]
        ip_batch([*lines, f"route add default via {lab.ROUTER_LAN}"], name)
    for name in lab.BACKENDS:
        ip_batch([f"addr add {lab.VIP}/32 dev lo", "link set tunl0 up"], name)
        rp = {f"net.ipv4.conf.{d}.rp_filter": "0" for d in ("all", "default", "eth0", "tunl0")}
        sysctls(name, {**lab.BACKEND_SYSCTLS, **rp})


def start_backend(name: str) -> None:
    ready = threading.Event()

    def serve() -> None:
        with netns(name):
            asyncio.run(lab.serve_names(name, lab.PORT, ready.set))

    threading.Thread(target=serve, daemon=True).start()
    if not ready.wait(60):
        raise RuntimeError(f"backend {name} did not start")


class Flows:
    """`ecmp_lab.hold_flows` on a thread inside the client namespace, driven from the main thread."""

    def __init__(self) -> None:
        self.phase = 0
        self.ports: list[int] = []
        self.ready = threading.Event()
        self.result: list[lab.Flow] | None = None
        self.error: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(300):
            raise RuntimeError(f"the flows did not open: {self.error}")
        if self.error:
            raise RuntimeError(self.error)

    def _run(self) -> None:
        try:
            with netns("client"):
                self.result = asyncio.run(self._main())
        except BaseException:
            self.error = traceback.format_exc()
            self.ready.set()

    async def _main(self) -> list[lab.Flow]:
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        return await lab.hold_flows(
            lab.VIP, lab.PORT, COUNT, INTERVAL, lambda: self.phase, self.stop, self._opened, TIMEOUT
        )

    def _opened(self, ports: list[int]) -> None:
        self.ports = ports
        self.ready.set()

    def finish(self) -> list[dict[str, Any]]:
        assert self.loop is not None and self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)
        if self.result is None:
            raise RuntimeError(f"the flows did not finish: {self.error}")
        return [dataclasses.asdict(flow) for flow in self.result]


def router_batch(lines: Sequence[str]) -> str:
    done = subprocess.run(
        ["ip", "-n", "router", "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ip -n router -batch failed: {done.stderr.strip()}")
    return done.stdout


def nft(ns: str, text: str) -> None:
    with netns(ns):
        subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True, timeout=60)


def ecmp_plan(architecture: api.Architecture, endpoints: Sequence[str] = tuple(lab.BACKENDS)) -> plan.Plan:
    port = lab.PORT if architecture is api.Architecture.nat else None
    algorithm = api.Algorithm.maglev if architecture is api.Architecture.nat else api.Algorithm.round_robin
    return make_plan(
        "flows",
        lab.VIP,
        architecture,
        [(lab.BACKENDS[name], port, 1) for name in endpoints],
        listeners=(("tcp", lab.PORT, "TCP"),),
        algorithm=algorithm,
    )


def run_flows(architecture: api.Architecture, *, n4: str | None = None) -> Findings:
    """Every node synced (n4 through a growing backend set; `n4`: a negative control), then the three
    phases under 100 flows."""
    found: Findings = {}
    p = ecmp_plan(architecture)
    nodes = {name: LB(name, ipvs_engine.IpvsEngine()) for name in lab.NODES}
    nodes["n4"] = LB("n4", ipvs_engine.IpvsEngine(sloppy=n4 != "not sloppy"))
    sysctls("n4", {"net.ipv4.vs.sloppy_tcp": "0"})
    for name, lb in nodes.items():
        if name == "n4":  # n4 saw be2 join after be3
            early = ecmp_plan(architecture, ("be1", "be3"))
            lb.sync(early, targets_of(early))
            schedule = (lambda *_: ("rr", None)) if n4 == "rr" else ipvs_rules.ipvs_schedule
            with mock.patch.object(ipvs_rules, "ipvs_schedule", schedule):
                lb.sync(p, targets_of(p))
                found["n4_resync"] = lb.sync(p, targets_of(p))["changes"]
        else:
            lb.sync(p, targets_of(p))
        if architecture is api.Architecture.nat:
            sysctls(name, {"net.ipv4.vs.conntrack": "1", "net.ipv4.vs.sloppy_tcp": "1"})
            nft(name, MASQUERADE)
    found["tables"] = {name: _servers(name) for name in lab.NODES}
    found["schedulers"] = {name: _scheduler(name) for name in lab.NODES}
    found["sysctls"] = {
        key: run(["cat", f"/proc/sys/net/ipv4/vs/{key}"], "n1").strip()
        for key in ("sloppy_tcp", "sloppy_sctp")
    }
    router_batch(lab.route_lines(lab.VIP, lab.PHASES[0]))
    flows = Flows()
    queries = lab.nexthop_queries(lab.VIP, lab.CLIENT, flows.ports)
    paths = [lab.nexthops_of(router_batch(queries))]
    time.sleep(1.0)
    for nodes_in_route in lab.PHASES[1:]:
        flows.phase += 1
        router_batch(lab.route_lines(lab.VIP, nodes_in_route))
        paths.append(lab.nexthops_of(router_batch(queries)))
        time.sleep(SETTLE)
    found.update(lab.summary(flows.finish(), paths))
    for name, lb in nodes.items():
        lb.remove(p)
        if architecture is api.Architecture.nat:
            run(["nft", "delete", "table", "ip", "ecmp_masq"], name)
    return found


def _servers(ns: str) -> list[str]:
    """The real servers of the VIP's services in the kernel's list order (head first): /proc/net/ip_vs
    (ipvsadm sorts them)."""
    with netns(ns), open("/proc/thread-self/net/ip_vs") as file:
        return [line.split()[1] for line in file if line.startswith("  -> ") and ":" in line.split()[1]]


def _scheduler(ns: str) -> str:
    """`mh (mh-fallback,mh-port)`: the service line of `ipvsadm -Ln` after the address."""
    listing = run(["ipvsadm", "-Ln", "-t", f"{lab.VIP}:{lab.PORT}"], ns)
    line = next(line for line in listing.splitlines() if line.startswith("TCP"))
    return " ".join(line.split()[2:])


def scenario() -> Findings:
    topology()
    for name in lab.BACKENDS:
        start_backend(name)
    found: Findings = {}
    found["dsr"] = run_flows(api.Architecture.dsr)
    found["tunnel"] = run_flows(api.Architecture.tunnel)
    found["dsr_n4_rr"] = run_flows(api.Architecture.dsr, n4="rr")
    found["dsr_n4_not_sloppy"] = run_flows(api.Architecture.dsr, n4="not sloppy")
    found["nat"] = run_flows(api.Architecture.nat)
    return found


def main(argv: Sequence[str]) -> int:
    """Runs the scenario and writes its findings (or the error) as JSON to the given path."""
    (result_path,) = argv
    return record(scenario, result_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A routed lab for the speaker's BGP: three nodes peering with an independent router (FRR), a client behind it.

    node1 10.0.60.1  fd00:60::1 ─┐                                   (AS 64513, every node)
    node2 10.0.60.2  fd00:60::2 ─┼─ lan/br0 ── router 10.0.60.254 fd00:60::254 (AS 64512, FRR)
    node3 10.0.60.3  fd00:60::3 ─┘                   │ 10.0.61.1 fd00:61::1
                                                  client 10.0.61.2 fd00:61::2

Every node runs the real `layerlb speaker` from a static configuration with a `bgp:` section, so BIRD 2
(the speaker's routing daemon) peers with the router. The router is FRR from Debian — zebra, bgpd and
bfdd, with their own configuration, pid files and vty sockets in the test's folder, so instances never
collide — a different BGP implementation from the speaker's, configured as a network engineer would
(`lab_router_config`): one eBGP neighbour per node address (IPv4 and IPv6), TCP-MD5, BFD 300 ms x 3,
`maximum-paths 8` so that a VIP learned from several nodes is installed with as many next hops, and the
kernel hashing the 5-tuple read from the headers (`ROUTER_SYSCTLS`: policy 3, fields 0x37) so that one
client's connections spread and each stays on its next hop. node1 also holds 10.0.60.11 (on its loopback), an iBGP neighbour of the router's 10.0.60.253 (local
preference is an iBGP attribute). `update-source eth0`: FRR 8.4 registers a BFD session before it knows the
session's interface and re-creates it once the TCP connection is up; when the first one was Up already,
BIRD takes its end for a failure ("Error: BFD session down") and connects again after its error wait (1 s,
`templates/bird.conf.j2`). Naming the interface makes that rarer; tests wait for sessions to settle.

Tests read the router's own view (`vtysh -c '... json'`, the kernel's routes in its namespace, bgpd's log)
and send traffic from the client to the VIPs: every node answers TCP on its loopback VIPs with its name.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kernel.speaker_lan import wait_until, write_config
from tests.netns import Namespace, Spawned, Topology

NODES = {"node1": "10.0.60.1", "node2": "10.0.60.2", "node3": "10.0.60.3"}
NODES6 = {"node1": "fd00:60::1", "node2": "fd00:60::2", "node3": "fd00:60::3"}
IBGP_SOURCE = "10.0.60.11"  # node1's second address, the router's iBGP neighbour
ROUTER, ROUTER6 = "10.0.60.254", "fd00:60::254"
ROUTER_IBGP = "10.0.60.253"  # the router's address for its iBGP session
CLIENT, CLIENT6 = "10.0.61.2", "fd00:61::2"
ROUTER_ASN, NODE_ASN = 64512, 64513
PASSWORD = "lab-secret"
PORT = 7000
FRR = Path("/usr/lib/frr")
TIMING = ["--heartbeat-interval", "0.1", "--dead-after", "0.5"]
# The multipath hash of the 5-tuple read from the headers (addresses, protocol, ports). Policy 1 first takes
# a hash the packet already carries: a veth keeps the one the client's socket gave it, which TCP draws anew
# when it retransmits, so a flow would change next hop by itself (see ecmp_lab).
ROUTER_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.fib_multipath_hash_policy": "3",
    "net.ipv4.fib_multipath_hash_fields": "0x0037",
    "net.ipv6.fib_multipath_hash_policy": "3",
    "net.ipv6.fib_multipath_hash_fields": "0x0037",
}

__all__ = [
    "NODES",
    "NODES6",
    "ROUTER_SYSCTLS",
    "BgpLab",
    "bgp_lab",
    "start_frr",
    "wait_until",
]  # wait_until: speaker_lan's


def lab_router_config(folder: Path) -> str:
    """The router's bgpd configuration: what a network engineer would write for a rack of these nodes."""
    neighbours4 = "".join(
        f" neighbor {address} peer-group NODES\n neighbor {address} update-source eth0\n"
        for address in NODES.values()
    )
    neighbours6 = "".join(
        f" neighbor {address} peer-group NODES6\n neighbor {address} update-source eth0\n"
        for address in NODES6.values()
    )
    return f"""hostname router
log file {folder}/bgpd.log debugging
log timestamp precision 3
debug bgp updates in
debug bgp neighbor-events
!
router bgp {ROUTER_ASN}
 bgp router-id {ROUTER}
 bgp log-neighbor-changes
 no bgp ebgp-requires-policy
 no bgp default ipv4-unicast
 neighbor NODES peer-group
 neighbor NODES remote-as {NODE_ASN}
 neighbor NODES password {PASSWORD}
 neighbor NODES bfd profile lab
 neighbor NODES6 peer-group
 neighbor NODES6 remote-as {NODE_ASN}
 neighbor NODES6 password {PASSWORD}
 neighbor NODES6 bfd profile lab
{neighbours4}{neighbours6} neighbor {IBGP_SOURCE} remote-as {ROUTER_ASN}
 neighbor {IBGP_SOURCE} password {PASSWORD}
 neighbor {IBGP_SOURCE} update-source {ROUTER_IBGP}
 !
 address-family ipv4 unicast
  neighbor NODES activate
  neighbor {IBGP_SOURCE} activate
  maximum-paths 8
  maximum-paths ibgp 8
 exit-address-family
 !
 address-family ipv6 unicast
  neighbor NODES6 activate
  maximum-paths 8
 exit-address-family
!
"""


BFDD_CONFIG = """hostname router
log file {folder}/bfdd.log debugging
log timestamp precision 3
debug bfd peer
debug bfd zebra
!
bfd
 profile lab
  receive-interval 300
  transmit-interval 300
  detect-multiplier 3
 !
!
"""


def serve_name(name: str, port: int) -> None:
    """Runs in a node: answers every TCP connection to any of its addresses on `port` with `name`."""
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::", port))
    server.listen(128)
    print("serving", flush=True)
    while True:
        connection, _ = server.accept()
        with connection:
            connection.sendall(name.encode())


def ask(address: str, port: int, count: int, timeout: float = 1.0) -> list[str]:
    """Runs in the client: `count` new TCP connections to `address` (each from another source port), and
    the name each was answered with ('' for a connection that failed)."""
    names = []
    for _ in range(count):
        try:
            with socket.create_connection((address, port), timeout=timeout) as connection:
                names.append(connection.recv(64).decode())
        except OSError:
            names.append("")
    return names


def request_loop(address: str, port: int, seconds: float, every: float, timeout: float = 0.25) -> None:
    """Runs in the client: prints `ready`, then for `seconds` opens a TCP connection to `address` every
    `every` seconds (a new source port each time) and prints `result` with a JSON list of [started,
    node's name or ''] (CLOCK_MONOTONIC, shared by the namespaces)."""
    print("ready", flush=True)
    done: list[tuple[float, str]] = []
    end = time.monotonic() + seconds
    while (started := time.monotonic()) < end:
        try:
            with socket.create_connection((address, port), timeout=timeout) as connection:
                done.append((started, connection.recv(64).decode()))
        except OSError:
            done.append((started, ""))
        time.sleep(max(0.0, every - (time.monotonic() - started)))
    print("result " + json.dumps(done), flush=True)


def outage(requests: Sequence[Sequence[Any]], since: float) -> tuple[float, int, int]:
    """From `request_loop`'s result: how long after `since` the client was served again for good (the
    start of the first request after the last failed one; 0 when none failed), failed and all requests."""
    after = [(float(started), name) for started, name in requests if float(started) >= since]
    failed = [index for index, (_, name) in enumerate(after) if not name]
    if not failed:
        return 0.0, 0, len(after)
    if failed[-1] + 1 >= len(after):
        return float("inf"), len(failed), len(after)
    return after[failed[-1] + 1][0] - since, len(failed), len(after)


@dataclass
class BgpLab:
    """The namespaces, the router's FRR daemons, and the speakers running now."""

    topology: Topology
    folder: Path
    nodes: dict[str, Namespace]
    router: Namespace
    client: Namespace
    bridge: Namespace
    frr: list[Spawned]
    speakers: dict[str, Spawned] = field(default_factory=dict)

    def configure(self, document: dict[str, Any], node: str | None = None) -> None:
        """Writes the static configuration (peers are the lab's nodes) of every node, or one, atomically."""
        write_config(self.folder, [node] if node else self.nodes, {"peers": NODES, **document})

    def start(self, node: str, *extra: str) -> Spawned:
        """Starts node's speaker (the real command, BIRD under it) and returns at once."""
        argv = [sys.executable, "-m", "layerlb.cli", "speaker", "--node", node]
        argv += ["--config", str(self.folder / f"{node}.yaml"), "--bgp-dir", str(self.bgp_dir(node))]
        self.speakers[node] = self.nodes[node].popen([*argv, *TIMING, *extra], what=f"speaker {node}")
        return self.speakers[node]

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node)

    def bgp_dir(self, node: str) -> Path:
        return self.folder / f"bgp-{node}"

    def status(self, node: str) -> dict[str, Any]:
        """The speaker's own report of its sessions (status.json): peer → BGPPeer status.nodes[] entry."""
        try:
            peers: dict[str, Any] = json.loads((self.bgp_dir(node) / "status.json").read_text())["peers"]
        except (OSError, ValueError):
            return {}
        return peers

    def vtysh(self, command: str) -> Any:
        """A `show ... json` command on the router, parsed."""
        done = self.router.run(["vtysh", "--vty_socket", str(self.folder / "frr"), "-c", command], timeout=20)
        return json.loads(done.stdout or "{}")

    def next_hops(self, prefix: str) -> set[str]:
        """The router's installed (FIB) next hops for `prefix`, from zebra's own table."""
        family = "ipv6" if ":" in prefix else "ip"
        routes = self.vtysh(f"show {family} route {prefix} json").get(prefix, [])
        return {
            hop.get("ip", "")
            for route in routes
            if route.get("protocol") == "bgp" and route.get("installed")
            for hop in route.get("nexthops", [])
            if hop.get("active") and hop.get("fib")
        }

    def kernel_next_hops(self, prefix: str) -> set[str]:
        """The next hops of `prefix` in the router namespace's kernel FIB (what forwards the packets)."""
        family = "-6" if ":" in prefix else "-4"
        routes = json.loads(self.router.ip(family, "-j", "route", "show", prefix) or "[]")
        hops: set[str] = set()
        for route in routes:
            if route.get("gateway"):
                hops.add(route["gateway"])
            hops |= {hop["gateway"] for hop in route.get("nexthops", []) if hop.get("gateway")}
        return hops

    def neighbour(self, address: str) -> dict[str, Any]:
        """The router's view of one BGP neighbour (`show bgp neighbors ADDRESS json`)."""
        found: dict[str, Any] = self.vtysh(f"show bgp neighbors {address} json").get(address, {})
        return found

    def ask(self, vip: str, count: int) -> list[str]:
        """Names of the nodes that answered `count` TCP connections from the client to `vip`."""
        return self.client.call(ask, vip, PORT, count)

    def log(self) -> str:
        """bgpd's log on the router (updates received, neighbour changes)."""
        return (self.folder / "bgpd.log").read_text(errors="replace")

    def bridge_port(self, node: str) -> str:
        return f"p-{node}"


def start_frr(router: Namespace, folder: Path, bgpd_config: str) -> list[Spawned]:
    """Starts the router's zebra, bfdd (`BFDD_CONFIG`) and bgpd (`bgpd_config`) in `router`, their files in
    `folder` (vtysh: `--vty_socket folder/frr`); returns once each listens."""
    sockets = folder / "frr"
    sockets.mkdir()
    (folder / "zebra.conf").write_text("hostname router\n!\n", encoding="utf-8")
    (folder / "bgpd.conf").write_text(bgpd_config, encoding="utf-8")
    (folder / "bfdd.conf").write_text(BFDD_CONFIG.format(folder=folder), encoding="utf-8")
    common = ["--vty_socket", str(sockets), "-u", "root", "-g", "frrvty", "-P", "0"]
    zserv = str(sockets / "zserv.api")
    daemons = [
        ["zebra", "-z", zserv],
        ["bfdd", "-z", zserv, "--bfdctl", str(sockets / "bfdd.sock")],
        ["bgpd", "-z", zserv, "-p", "179"],
    ]
    started = []
    for daemon, *options in daemons:
        argv = [str(FRR / daemon), *options, "-f", str(folder / f"{daemon}.conf")]
        argv += ["-i", str(folder / f"{daemon}.pid"), *common]
        started.append(router.popen(argv, what=f"router {daemon}"))
        wait_until(f"router {daemon} listens", (sockets / f"{daemon}.vty").exists, timeout=15)
    return started


@contextlib.contextmanager
def bgp_lab(folder: Path, vips: Sequence[str] = ()) -> Iterator[BgpLab]:
    """Builds the lab (removed on exit, also on failure), the router's FRR running, each node serving its
    name on `vips` (on its loopback); speakers are started by the caller."""
    with Topology("bgp") as topology:
        bridge = topology.namespace("lan")
        router = topology.namespace("router")
        client = topology.namespace("client")
        nodes = {name: topology.namespace(name) for name in NODES}
        ports = []
        for name, namespace in nodes.items():
            topology.link(namespace, "eth0", bridge, f"p-{name}")
            ports.append(f"p-{name}")
            namespace.addr("eth0", f"{NODES[name]}/24")
            namespace.ip("addr", "add", f"{NODES6[name]}/64", "dev", "eth0", "nodad")
            namespace.route(f"default via {ROUTER}")
            namespace.ip("-6", "route", "add", "default", "via", ROUTER6)
            for vip in vips:
                namespace.ip("addr", "add", vip + ("/128" if ":" in vip else "/32"), "dev", "lo")
        nodes["node1"].ip("addr", "add", f"{IBGP_SOURCE}/32", "dev", "lo")
        topology.link(router, "eth0", bridge, "p-router")
        ports.append("p-router")
        topology.bridge(bridge, "br0", ports)
        bridge.ip("link", "set", "br0", "type", "bridge", "forward_delay", "0")
        router.addr("eth0", f"{ROUTER}/24")
        router.ip("addr", "add", f"{ROUTER_IBGP}/24", "dev", "eth0")
        router.ip("addr", "add", f"{ROUTER6}/64", "dev", "eth0", "nodad")
        topology.link(router, "eth1", client, "eth0")
        router.addr("eth1", "10.0.61.1/24")
        router.ip("addr", "add", "fd00:61::1/64", "dev", "eth1", "nodad")
        client.addr("eth0", f"{CLIENT}/24")
        client.ip("addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
        client.route("default via 10.0.61.1")
        client.ip("-6", "route", "add", "default", "via", "fd00:61::1")
        for key, value in ROUTER_SYSCTLS.items():
            router.sysctl(key, value)
        frr = start_frr(router, folder, lab_router_config(folder))
        for name, namespace in nodes.items():
            namespace.spawn(serve_name, name, PORT).wait_for_line("serving", timeout=10)
        lab = BgpLab(topology, folder, nodes, router, client, bridge, frr)
        wait_until("the router's bgpd answers", lambda: lab.vtysh("show bgp summary json"), timeout=15)
        yield lab

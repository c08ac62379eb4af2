"""A LAN of speaker nodes for the speaker's tests and benchmark: one bridge, N nodes, one client.

    node1 10.0.50.1 ─┐
    node2 10.0.50.2 ─┼─ lan/br0 ── client 10.0.50.100 (fd00:50::100)
    node3 10.0.50.3 ─┘

Every node runs the real `layerlb speaker` process from a static configuration (`config.yaml` per node,
all alike) and has the VIPs on its loopback with arp_ignore=1 / arp_announce=2, as a node whose forwarding
catches the VIP would: the kernel then never answers ARP for them itself, only the speaker does, and a
ping from the client reaches whichever node the client's neighbour cache points at. The client resolves
VIPs with its own kernel (ping, `ip neigh`) and with arping/ndisc6; `ArpWatcher` records every ARP frame
it sees, with its own parser, independent of the speaker's framing.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.netns import Namespace, Spawned, Topology

NODES = {"node1": "10.0.50.1", "node2": "10.0.50.2", "node3": "10.0.50.3"}
NODES6 = {"node1": "fd00:50::1", "node2": "fd00:50::2", "node3": "fd00:50::3"}
CLIENT, CLIENT6 = "10.0.50.100", "fd00:50::100"
TIMING = ["--heartbeat-interval", "0.1", "--dead-after", "0.5"]


def wait_until(what: str, condition: Callable[[], Any], timeout: float = 20.0, every: float = 0.05) -> Any:
    """Polls `condition` until it returns something truthy (returned); fails with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def write_config(folder: Path, nodes: Iterable[str], document: dict[str, Any]) -> None:
    """Writes `document` as each node's static configuration, `folder/NODE.yaml`, atomically (a running
    speaker reloads it)."""
    for name in nodes:
        target = folder / f"{name}.yaml"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump(document), encoding="utf-8")
        temporary.replace(target)


def watch_arp(path: str, interface: str) -> None:
    """Runs in the client: appends one JSON line per ARP frame seen (op, sender IP and MAC, time)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    sock.bind((interface, 0x0806))
    print("watching", flush=True)
    with open(path, "a", encoding="utf-8") as out:
        while True:
            frame = sock.recv(2048)
            if len(frame) < 42:
                continue
            op = struct.unpack_from("!H", frame, 20)[0]
            sender_mac = ":".join(f"{b:02x}" for b in frame[22:28])
            sender_ip = socket.inet_ntoa(frame[28:32])
            target_ip = socket.inet_ntoa(frame[38:42])
            line = {"op": op, "ip": sender_ip, "mac": sender_mac, "target": target_ip, "t": time.time()}
            out.write(json.dumps(line) + "\n")
            out.flush()


def probe_all(interface: str, vips: list[str], deadline: float) -> None:
    """Runs in the client: ARP requests (framed here, not by the speaker's code) for every VIP, every 200 ms
    for those not answered yet; prints "answered WALLTIME_OF_THE_LAST COUNT" when all answered or at the
    deadline."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    sock.bind((interface, 0x0806))
    mac = sock.getsockname()[4]
    sock.settimeout(0.02)
    pending = {socket.inet_aton(vip) for vip in vips}
    last = 0.0
    print("probing", flush=True)
    while pending and time.time() < deadline:
        for target in list(pending):
            frame = b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            frame += mac + socket.inet_aton(CLIENT) + b"\x00" * 6 + target
            sock.send(frame + bytes(60 - len(frame)))
        until = time.time() + 0.2
        while time.time() < until:
            try:
                reply = sock.recv(2048)
            except TimeoutError:
                continue
            if len(reply) >= 42 and reply[20:22] == b"\x00\x02" and reply[28:32] in pending:
                pending.discard(reply[28:32])
                last = time.time()
    print(f"answered {last} {len(vips) - len(pending)}", flush=True)


@dataclass
class Lan:
    """The topology, its namespaces by name, each node's MAC, and the speakers running now."""

    topology: Topology
    folder: Path
    nodes: dict[str, Namespace]
    client: Namespace
    bridge: Namespace
    macs: dict[str, str]
    speakers: dict[str, Spawned] = field(default_factory=dict)
    extra_args: dict[str, list[str]] = field(default_factory=dict)

    def configure(self, vips: Sequence[dict[str, Any]], node: str | None = None) -> None:
        """Writes the static configuration (every node's, or one node's) atomically."""
        write_config(self.folder, [node] if node else self.nodes, {"peers": NODES, "vips": list(vips)})

    def start(self, node: str, *extra: str) -> Spawned:
        """Starts node's speaker (the real command) and returns at once."""
        argv = [sys.executable, "-m", "layerlb.cli", "speaker", "--node", node]
        argv += ["--config", str(self.folder / f"{node}.yaml"), *TIMING, *extra]
        self.speakers[node] = self.nodes[node].popen(argv, what=f"speaker {node}")
        return self.speakers[node]

    def start_all(self, *extra: str) -> None:
        for node in self.nodes:
            self.start(node, *extra)
        for node in self.nodes:
            self.speakers[node].wait_for_line("joined", timeout=30)

    def kill(self, node: str) -> float:
        """SIGKILL of node's speaker; returns when it was sent (time.monotonic)."""
        spawned = self.speakers.pop(node)
        moment = time.monotonic()
        spawned.process.kill()
        spawned.process.wait(10)
        return moment

    def arping(self, vip: str, count: int = 2) -> set[str]:
        """The MACs that answered `count` ARP requests for `vip` from the client (arping)."""
        done = self.client.run(["arping", "-c", str(count), "-i", "eth0", vip], check=False, timeout=20)
        return set(re.findall(r"from ([0-9a-f:]{17})", done.stdout.lower()))

    def ndisc(self, vip: str) -> set[str]:
        """The MACs that answered a Neighbor Solicitation for `vip` from the client (ndisc6, all replies)."""
        done = self.client.run(
            ["ndisc6", "-m", "-n", "-r", "2", "-w", "500", vip, "eth0"], check=False, timeout=20
        )
        found = re.findall(r"link-layer address:\s*([0-9A-Fa-f:]{17})", done.stdout)
        return {mac.lower() for mac in found}

    def neighbour(self, vip: str) -> str | None:
        """The client kernel's neighbour-cache MAC for `vip` (any state with an address), or None."""
        output = self.client.ip("neigh", "show", vip, "dev", "eth0")
        match = re.search(r"lladdr ([0-9a-f:]{17})", output)
        return match.group(1) if match else None

    def ping(self, vip: str) -> bool:
        """One echo from the client to `vip`, answered by whichever node the client resolved."""
        return self.client.run(["ping", "-c1", "-W1", "-n", vip], check=False, timeout=10).returncode == 0

    def node_of(self, mac: str | None) -> str | None:
        return next((node for node, each in self.macs.items() if each == mac), None)

    def bridge_port(self, node: str) -> str:
        return f"p-{node}"


@contextlib.contextmanager
def lan(folder: Path, vips_on_loopback: Iterable[str] = (), nodes: int = 3) -> Any:
    """Builds the LAN (removed on exit, also on failure); speakers are started by the caller."""
    with Topology("spk") as topology:
        bridge = topology.namespace("lan")
        client = topology.namespace("client")
        names = list(NODES)[:nodes]
        members = {name: topology.namespace(name) for name in names}
        ports = []
        for name, namespace in members.items():
            topology.link(namespace, "eth0", bridge, f"p-{name}")
            ports.append(f"p-{name}")
            namespace.sysctl("net.ipv4.conf.all.arp_ignore", 1)
            namespace.sysctl("net.ipv4.conf.all.arp_announce", 2)
            namespace.addr("eth0", f"{NODES[name]}/24")
            namespace.ip("addr", "add", f"{NODES6[name]}/64", "dev", "eth0", "nodad")
            for vip in vips_on_loopback:
                namespace.ip("addr", "add", vip + ("/128" if ":" in vip else "/32"), "dev", "lo")
        topology.link(client, "eth0", bridge, "p-client")
        ports.append("p-client")
        client.addr("eth0", f"{CLIENT}/24")
        client.ip("addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
        topology.bridge(bridge, "br0", ports)
        # Forward at once: a new bridge port would otherwise spend its first seconds learning.
        bridge.ip("link", "set", "br0", "type", "bridge", "forward_delay", "0")
        macs = {
            name: json.loads(namespace.ip("-j", "link", "show", "eth0"))[0]["address"]
            for name, namespace in members.items()
        }
        yield Lan(topology, folder, members, client, bridge, macs)

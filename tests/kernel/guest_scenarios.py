"""Scenarios that run inside the QEMU guest (Debian's kernel, which has IPVS and IPIP), so that the IPVS
engine is proven with real packets: each builds network namespaces (client, LB, backends), drives the
engine, sends traffic, and writes one JSON document of findings that the host test asserts on.

    python -m tests.kernel.guest_scenarios {nat,dsr,tunnel,bench} RESULT.json

Run from the repository root, as root, in a kernel with IPVS (the host test boots the guest for it).
Everything runs in this one process, because starting Python under emulation costs seconds: servers are
threads whose sockets were created inside their namespace (`setns` moves only the calling thread, and a
socket keeps the namespace it was created in), and the engine is called from the main thread switched
into the LB's namespace, so its netlink socket and its `ip` children are there too. The tests look at
the kernel through `ipvsadm`, independently of the engine's own netlink read.

Findings are plain values (counts, lists, booleans); the scenario asserts nothing itself, so a failing
host test shows everything the guest saw. An exception is reported as `{"error": traceback}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from layerlb_dataplane.control import probes
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.kernel.ipvs import desired as ipvs_desired
from layerlb_dataplane.kernel.ipvs import engine as ipvs_engine
from layerlb_dataplane.kernel.ipvs import proc as ipvs_proc
from layerlb_dataplane.kernel.ipvs import table as ipvs_table

from layerlb import api, plan
from layerlb.render import formats, shared

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
Findings = dict[str, Any]


# --- namespaces --------------------------------------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


@contextlib.contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Runs the block with the calling thread in network namespace `name` (None: where it is)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(own)
        os.close(own)
        os.close(target)


def ip_batch(lines: Sequence[str], ns: str | None = None) -> None:
    """Many `ip` commands in one process (each process start costs a lot under emulation)."""
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    done = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def run(argv: Sequence[str], ns: str | None = None) -> str:
    with netns(ns):
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} (in {ns}) failed: {done.stderr.strip()}")
    return done.stdout


def sysctls(ns: str, values: Mapping[str, str]) -> None:
    with netns(ns):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as file:
                file.write(value + "\n")


def read_sysctl(ns: str, key: str) -> str:
    with netns(ns), open("/proc/sys/" + key.replace(".", "/")) as file:
        return file.read().strip()


def device_counters(ns: str, device: str) -> dict[str, int]:
    """rx/tx bytes and packets of `device`, from /proc/net/dev of the namespace."""
    with netns(ns), open("/proc/thread-self/net/dev") as file:
        for line in file.read().splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == device:
                fields = [int(word) for word in rest.split()]
                return {
                    "rx_bytes": fields[0],
                    "rx_packets": fields[1],
                    "tx_bytes": fields[8],
                    "tx_packets": fields[9],
                }
    raise KeyError(f"{device} not in {ns}")


def addresses(ns: str, device: str) -> list[dict[str, Any]]:
    """The addresses of `device` as `ip -j` gives them (local, prefixlen, label)."""
    loaded = json.loads(run(["ip", "-j", "addr", "show", "dev", device], ns) or "[]")
    return [
        {"local": info.get("local"), "prefixlen": info.get("prefixlen"), "label": info.get("label")}
        for link in loaded
        for info in link.get("addr_info", [])
    ]


def mac_of(ns: str, device: str) -> str:
    return str(json.loads(run(["ip", "-j", "link", "show", "dev", device], ns))[0]["address"])


# --- servers and clients -----------------------------------------------------------------------------


class Backend:
    """A TCP (and UDP) server in a namespace: each line gets `<name> <peer address>` back, `big N` N bytes."""

    def __init__(self, name: str, ns: str, port: int, udp_port: int | None = None) -> None:
        self.name, self.ns, self.port = name, ns, port
        self.listener: socket.socket | None = None
        self.listen()
        if udp_port is not None:
            with netns(ns):
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                udp.bind(("0.0.0.0", udp_port))
            threading.Thread(target=self._udp, args=(udp,), daemon=True).start()

    def listen(self) -> None:
        """(Re)opens the TCP listener."""
        with netns(self.ns):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", self.port))
            listener.listen(256)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop_listening(self) -> None:
        """Refuses new connections (a health probe fails); accepted ones carry on."""
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, peer = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection, peer[0]), daemon=True).start()

    def _serve(self, connection: socket.socket, peer: str) -> None:
        with contextlib.suppress(OSError), connection, connection.makefile("rb") as reader:
            for line in reader:
                words = line.split()
                if words[:1] == [b"big"]:
                    size = int(words[1])
                    chunk = b"x" * 65536
                    while size > 0:
                        connection.sendall(chunk[: min(size, len(chunk))])
                        size -= len(chunk)
                    connection.sendall(b"\n")
                else:
                    connection.sendall(f"{self.name} {peer}\n".encode())

    def _udp(self, udp: socket.socket) -> None:
        while True:
            _, peer = udp.recvfrom(2048)
            udp.sendto(f"{self.name} {peer[0]}".encode(), peer)


class Connection:
    """A client's TCP connection to the VIP."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def ask(self) -> tuple[str, str]:
        """(backend, peer the backend saw)."""
        self.sock.sendall(b"hello\n")
        name, peer = self.reader.readline().decode().split()
        return name, peer

    def big(self, size: int) -> int:
        """Asks for `size` bytes; returns how many arrived."""
        self.sock.sendall(f"big {size}\n".encode())
        return len(self.reader.readline()) - 1

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Client:
    """Opens connections and sends datagrams from its namespace."""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def connect(self, address: str, port: int, timeout: float = 20.0) -> Connection:
        with netns(self.ns):
            sock = socket.create_connection((address, port), timeout=timeout)
        return Connection(sock)

    def outcome(self, address: str, port: int) -> str:
        """Who answers a new connection to `address:port` (the backend's name), or "refused" or "timeout"."""
        try:
            return self.ask_new(address, port)[0]
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"

    def ask_new(self, address: str, port: int) -> tuple[str, str]:
        """One question on a new connection."""
        connection = self.connect(address, port)
        try:
            return connection.ask()
        finally:
            connection.close()

    def spread(self, address: str, port: int, count: int) -> tuple[dict[str, int], list[str]]:
        """`count` new connections: how many each backend took, and the peers the backends saw."""
        answers = [self.ask_new(address, port) for _ in range(count)]
        return dict(Counter(name for name, _ in answers)), sorted({peer for _, peer in answers})

    def connect_to(self, address: str, port: int, backend: str, attempts: int = 50) -> Connection:
        """A connection that landed on `backend` (others are closed)."""
        for _ in range(attempts):
            connection = self.connect(address, port)
            if connection.ask()[0] == backend:
                return connection
            connection.close()
        raise RuntimeError(f"no connection to {address}:{port} landed on {backend}")

    def datagram(self, address: str, port: int, timeout: float = 10.0) -> tuple[str, str, str]:
        """One datagram from a fresh socket (a new flow): (backend, peer it saw, source of the reply)."""
        with netns(self.ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(timeout)
            sock.sendto(b"hello", (address, port))
            data, source = sock.recvfrom(2048)
        name, peer = data.decode().split()
        return name, peer, source[0]


# --- plans and the kernel's view ---------------------------------------------------------------------


def make_plan(
    name: str,
    vip: str,
    architecture: api.Architecture,
    endpoints: Sequence[tuple[str, int | None, int]],
    *,
    listeners: Sequence[tuple[str, int, str]] = (("tcp", 80, "TCP"),),
    algorithm: api.Algorithm = api.Algorithm.round_robin,
    affinity: api.AffinityType = api.AffinityType.None_,
    engine: api.Engine = api.Engine.ipvs,
    generation: int = 1,
    namespace: str = "guest",
) -> plan.Plan:
    """An L4 Plan as the operator would resolve it: one backend `app` serving every listener."""
    return plan.Plan(
        name=name,
        namespace=namespace,
        generation=generation,
        mode=api.Mode.L4,
        architecture=architecture,
        engine=engine,
        vip=vip,
        listeners=tuple(
            plan.Listener(
                name=n, port=port, protocol=api.Protocol(t), transport="UDP" if t == "UDP" else "TCP"
            )
            for n, port, t in listeners
        ),
        backends=(
            plan.Backend(
                name="app",
                algorithm=algorithm,
                endpoints=tuple(plan.Endpoint(address=a, port=p, weight=w) for a, p, w in endpoints),
            ),
        ),
        default_backend="app",
        session_affinity=plan.SessionAffinity(type=affinity, timeout_seconds=600),
    )


def targets_of(p: plan.Plan) -> dict[str, list[Target]]:
    backend = shared.serving_backend(p)
    return {backend.name: [Target(backend.name, e.address, e.port, e.weight) for e in backend.endpoints]}


def parse_listing(text: str) -> dict[ipvs_table.ServiceKey, ipvs_table.VirtualService]:
    """The TCP and UDP services of `ipvsadm -Ln --exact` output, with real servers and connection counts:
    the tests' own view of the kernel's table, independent of the engine's netlink read.

    fwmark and SCTP services (and their servers) are skipped: layerlb never creates them.
    """
    services: dict[ipvs_table.ServiceKey, ipvs_table.VirtualService] = {}
    current: ipvs_table.VirtualService | None = None
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] in ("TCP", "UDP") and len(words) >= 3:
            address, port = ipvs_table.split_host_port(words[1])
            persistence: int | None = None
            flags: str | None = None
            extra: list[str] = []
            rest = iter(words[3:])
            for word in rest:
                if word == "persistent":
                    persistence = int(next(rest))
                elif word.startswith("(") and word.endswith(")"):
                    flags = word[1:-1]  # `mh (mh-fallback,mh-port)`
                else:
                    extra.append(word)
            key = ipvs_table.ServiceKey(words[0], address, port)
            current = services[key] = ipvs_table.VirtualService(
                key, words[2], persistence, flags, tuple(extra)
            )
        elif words[0] == "->" and len(words) >= 6 and words[1] != "RemoteAddress:Port":
            if current is None:
                continue
            address, port = ipvs_table.split_host_port(words[1])
            forward = ipvs_table.FORWARD_FLAGS.get(words[2], words[2])
            server = ipvs_table.RealServer(
                address, port, forward, int(words[3]), int(words[4]), int(words[5])
            )
            current.servers[server.key] = server
        elif words[0] != "->":
            current = None  # a header, or a service of a kind layerlb does not own
    return services


def table(ns: str, vip: str | None = None) -> dict[str, Any]:
    """The kernel's IPVS services (of `vip`, or all) as `ipvsadm` lists them, in a JSON-friendly form keyed
    `TCP 10.0.0.1:80`."""
    return as_json(parse_listing(run(["ipvsadm", "-Ln", "--exact"], ns)), vip)


def engine_table(ns: str, vip: str) -> dict[str, Any]:
    """`table`, as the engine reads it (netlink dump + /proc), to compare with ipvsadm's view."""
    with netns(ns):
        return as_json(ipvs_engine.IpvsEngine().read(vip), vip)


def as_json(
    services: Mapping[ipvs_table.ServiceKey, ipvs_table.VirtualService], vip: str | None
) -> dict[str, Any]:
    return {
        f"{key.protocol} {shared.host_port(key.address, key.port)}": {
            "scheduler": service.scheduler,
            "flags": service.flags,
            "persistence": service.persistence,
            "servers": {
                shared.host_port(*server.key): {
                    "forward": server.forward,
                    "weight": server.weight,
                    "active": server.active,
                    "inactive": server.inactive,
                }
                for server in service.servers.values()
            },
        }
        for key, service in sorted(services.items())
        if vip is None or key.address == vip
    }


def saved(ns: str, needle: str) -> list[str]:
    """`ipvsadm-save -n` lines that mention `needle` (the kernel's rules in the render's own syntax).

    ipvsadm spells out the default tunnel type (`-i ... --tun-type ipip`); the render's `-i` means it.
    """
    lines = run(["ipvsadm", "-S", "-n"], ns).splitlines()
    return sorted(line.strip().replace(" --tun-type ipip", "") for line in lines if needle in line)


def rendered(p: plan.Plan) -> list[str]:
    """The render's `-A`/`-a` lines for `p`: what the kernel must hold once the engine synced it."""
    return sorted(line for line in formats.render(p, "ipvs").splitlines() if line.startswith(("-A", "-a")))


def ipvs_stats(ns: str, vip: str) -> dict[str, dict[str, int]]:
    """Per service of `vip`: connections, packets and bytes in (client to server) and out (replies)."""
    stats: dict[str, dict[str, int]] = {}
    for line in run(["ipvsadm", "-Ln", "--stats", "--exact"], ns).splitlines():
        words = line.split()
        if len(words) == 7 and words[0] in ("TCP", "UDP") and words[1].startswith(f"{vip}:"):
            numbers = [int(word) for word in words[2:]]
            stats[f"{words[0]} {words[1]}"] = dict(
                zip(("conns", "in_packets", "out_packets", "in_bytes", "out_bytes"), numbers, strict=True)
            )
    return stats


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.3) -> float | None:
    """Seconds until `condition()` held, or None if it did not within `timeout`."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(step)


class LB:
    """An engine used from the LB's namespace, as `layerlb serve` would run it there."""

    def __init__(self, ns: str, engine: ipvs_engine.IpvsEngine | Any) -> None:
        self.ns = ns
        self.engine = engine

    def sync(self, p: plan.Plan, targets: Mapping[str, Sequence[Target]]) -> dict[str, float]:
        with netns(self.ns):
            report = self.engine.sync(p, targets)
        return {"changes": report.changes, "seconds": round(report.seconds, 4)}

    def remove(self, p: plan.Plan) -> None:
        with netns(self.ns):
            self.engine.remove(p)


def probe_until(
    ns: str, target: Target, check: plan.HealthCheck, address: str, port: int, healthy: bool
) -> int:
    """Real TCP probes from `ns` fed to the target's HealthState until it says `healthy`; how many it took."""

    async def probe_once() -> bool:
        return await probes.probe(check, address, port)

    for count in range(1, 20):
        with netns(ns):
            passed = asyncio.run(probe_once())
        target.health.record(passed)
        if target.health.healthy == healthy:
            return count
    raise RuntimeError(f"{address}:{port} never became {'healthy' if healthy else 'unhealthy'}")


# --- nat ---------------------------------------------------------------------------------------------

NAT_VIP, NAT_VIP2, FOREIGN_VIP, SCRATCH_VIP = "10.0.100.1", "10.0.100.2", "10.0.9.9", "10.0.9.10"
NAT_CLIENT = "10.0.1.2"
NAT_BACKENDS = {"be1": "10.0.2.11", "be2": "10.0.2.12", "be3": "10.0.2.13"}
NAT_PORT, UDP_PORT, BACKEND_PORT = 80, 5353, 8080
NODE_SERVICE_PORT = 2222  # a node service on the LB's wildcard address (sshd, say), not a listener
HEALTH = plan.HealthCheck(
    protocol=api.HealthProtocol.TCP,
    path="/",
    port=None,
    interval_seconds=1,
    timeout_seconds=2,
    healthy_threshold=2,
    unhealthy_threshold=2,
)


def nat_topology(prefix: str = "", backends: Mapping[str, str] = NAT_BACKENDS) -> None:
    """client -- lb (routes) -- br0 -- backends; the backends' default route is via the LB."""
    c, lb = f"{prefix}c", f"{prefix}lb"
    lines = [f"netns add {c}", f"netns add {lb}"]
    lines += [f"netns add {prefix}{name}" for name in backends]
    lines += [f"link add eth0 netns {c} type veth peer name eth0 netns {lb}"]
    lines += [f"link add eth0 netns {prefix}{n} type veth peer name p{n} netns {lb}" for n in backends]
    ip_batch(lines)
    ip_batch(
        [
            "link set lo up",
            "link set eth0 up",
            "addr add 10.0.1.2/24 dev eth0",
            "route add default via 10.0.1.1",
        ],
        c,
    )
    lb_lines = [
        "link set lo up",
        "link set eth0 up",
        "addr add 10.0.1.1/24 dev eth0",
        "link add br0 type bridge",
    ]
    for name in backends:
        lb_lines += [f"link set p{name} master br0", f"link set p{name} up"]
    ip_batch([*lb_lines, "link set br0 up", "addr add 10.0.2.1/24 dev br0"], lb)
    for name, address in backends.items():
        ip_batch(
            [
                "link set lo up",
                "link set eth0 up",
                f"addr add {address}/24 dev eth0",
                "route add default via 10.0.2.1",
            ],
            f"{prefix}{name}",
        )


def scenario_nat() -> Findings:
    """IPVS masquerading: weights, UDP, health, drain, idempotence, foreign services, restart, removal."""
    found: Findings = {}
    nat_topology()
    run(["ipvsadm", "--set", "0", "0", "3"], "lb")  # UDP flows expire 3 s after their last datagram
    client = Client("c")
    backends = {name: Backend(name, name, BACKEND_PORT, udp_port=BACKEND_PORT) for name in NAT_BACKENDS}
    # Someone else's services in the same namespace: one on another address, one by firewall mark.
    run(["ipvsadm", "-A", "-t", f"{FOREIGN_VIP}:8080", "-s", "lc"], "lb")
    run(["ipvsadm", "-a", "-t", f"{FOREIGN_VIP}:8080", "-r", "10.0.2.11:8080", "-m", "-w", "5"], "lb")
    run(["ipvsadm", "-A", "-f", "7", "-s", "rr"], "lb")
    foreign_before = saved("lb", FOREIGN_VIP) + saved("lb", "-f 7")
    found["foreign_before"] = foreign_before
    found["ip_forward_before"] = read_sysctl("lb", "net.ipv4.ip_forward")

    endpoints = [(NAT_BACKENDS["be1"], BACKEND_PORT, 1), (NAT_BACKENDS["be2"], BACKEND_PORT, 2)]
    listeners = (("tcp", NAT_PORT, "TCP"), ("dns", UDP_PORT, "UDP"))
    p1 = make_plan("web", NAT_VIP, api.Architecture.nat, endpoints, listeners=listeners)
    targets = targets_of(p1)
    lb = LB("lb", ipvs_engine.IpvsEngine(drain_seconds=30))
    found["first_sync"] = lb.sync(p1, targets)
    found["table_first"] = table("lb", NAT_VIP)
    found["engine_view_first"] = engine_table("lb", NAT_VIP)
    found["kernel_lines"] = saved("lb", NAT_VIP)
    found["render_lines"] = rendered(p1)
    found["vip_on_lo"] = [a for a in addresses("lb", "lo") if a["local"] == NAT_VIP]
    found["ip_forward_after"] = read_sysctl("lb", "net.ipv4.ip_forward")

    found["spread"], found["peers"] = client.spread(NAT_VIP, NAT_PORT, 30)
    udp = [client.datagram(NAT_VIP, UDP_PORT) for _ in range(12)]
    found["udp_spread"] = dict(Counter(name for name, _, _ in udp))
    found["udp_peers"] = sorted({peer for _, peer, _ in udp})
    found["udp_reply_sources"] = sorted({source for _, _, source in udp})
    tcp_service = f"TCP {NAT_VIP}:{NAT_PORT}"
    wait_until(lambda: ipvs_stats("lb", NAT_VIP)[tcp_service]["conns"] >= 30, timeout=20)  # see direct_return
    found["stats"] = ipvs_stats("lb", NAT_VIP)
    found["resync"] = lb.sync(p1, targets)

    # The VIP guard (issue #18): a service of the LB node's own, on its wildcard address, is reachable on
    # the node's address and not through the VIP, while IPVS keeps the listeners' ports (above).
    Backend("node", "lb", NODE_SERVICE_PORT)
    found["guard_node_address"] = client.outcome("10.0.1.1", NODE_SERVICE_PORT)
    found["guard_vip"] = client.outcome(NAT_VIP, NODE_SERVICE_PORT)
    found["guard_tables"] = run(["nft", "list", "tables"], "lb").split()

    # Health: real TCP probes from the LB find be2 down once it refuses connections; weight 0 follows.
    be2_target = targets["app"][1]
    be2_target.health.configure(HEALTH)
    held = client.connect_to(NAT_VIP, NAT_PORT, "be2")
    backends["be2"].stop_listening()
    found["probes_to_down"] = probe_until(
        "lb", be2_target, HEALTH, NAT_BACKENDS["be2"], BACKEND_PORT, healthy=False
    )
    found["health_down_sync"] = lb.sync(p1, targets)
    found["table_health_down"] = table("lb", NAT_VIP)
    found["spread_health_down"], _ = client.spread(NAT_VIP, NAT_PORT, 10)
    found["held_during_down"] = held.ask()
    found["health_down_resync"] = lb.sync(p1, targets)
    backends["be2"].listen()
    found["probes_to_up"] = probe_until(
        "lb", be2_target, HEALTH, NAT_BACKENDS["be2"], BACKEND_PORT, healthy=True
    )
    found["health_up_sync"] = lb.sync(p1, targets)
    found["table_health_up"] = table("lb", NAT_VIP)
    found["spread_health_up"], _ = client.spread(NAT_VIP, NAT_PORT, 9)
    held.close()

    # Drain: be2 leaves the Plan while a connection to it is open.
    draining = client.connect_to(NAT_VIP, NAT_PORT, "be2")
    p2 = make_plan("web", NAT_VIP, api.Architecture.nat, endpoints[:1], listeners=listeners, generation=2)
    targets2 = targets_of(p2)
    gone = Target("app", NAT_BACKENDS["be2"], BACKEND_PORT, 2)
    gone.draining = True  # what state.Registry reports for an endpoint that left the Plan
    targets2["app"].append(gone)
    found["drain_sync"] = lb.sync(p2, targets2)
    found["table_drain_start"] = table("lb", NAT_VIP)
    found["drain_next_resync_pending"] = lb.engine.next_resync(p2) is not None
    found["spread_draining"], _ = client.spread(NAT_VIP, NAT_PORT, 10)
    found["draining_connection_answers"] = draining.ask()
    found["drain_resync_while_open"] = lb.sync(p2, targets2)
    found["table_drain_open"] = table("lb", NAT_VIP)
    draining.close()

    def be2_deleted(protocol: str, port: int) -> Callable[[], bool]:
        def check() -> bool:
            lb.sync(p2, targets2)
            servers = table("lb", NAT_VIP).get(f"{protocol} {NAT_VIP}:{port}", {}).get("servers", {})
            return f"{NAT_BACKENDS['be2']}:{BACKEND_PORT}" not in servers

        return check

    found["drain_tcp_deleted_after"] = wait_until(be2_deleted("TCP", NAT_PORT), timeout=25)
    found["drain_udp_deleted_after"] = wait_until(be2_deleted("UDP", UDP_PORT), timeout=25)
    found["table_drained"] = table("lb", NAT_VIP)
    found["drain_next_resync_after"] = lb.engine.next_resync(p2)
    found["drained_resync"] = lb.sync(p2, targets2)

    # A listener leaves the Plan: its service drains like its servers (weight 0, then deleted at the next
    # sync that finds no flow left).
    p2 = make_plan("web", NAT_VIP, api.Architecture.nat, endpoints[:1], generation=3)
    found["listener_removed_sync"] = lb.sync(p2, targets_of(p2))
    found["table_listener_draining"] = table("lb", NAT_VIP)

    def udp_service_gone() -> bool:
        lb.sync(p2, targets_of(p2))
        return f"UDP {NAT_VIP}:{UDP_PORT}" not in table("lb", NAT_VIP)

    found["listener_deleted_after"] = wait_until(udp_service_gone, timeout=25)
    found["table_listener_removed"] = table("lb", NAT_VIP)

    # Restart: a new engine instance adopts the kernel's state; an open connection does not notice.
    kept = client.connect(NAT_VIP, NAT_PORT)
    found["kept_before"] = kept.ask()
    restarted = LB("lb", ipvs_engine.IpvsEngine(drain_seconds=30))
    found["restart_sync"] = restarted.sync(p2, targets_of(p2))
    found["kept_after"] = kept.ask()
    found["table_after_restart"] = table("lb", NAT_VIP)
    kept.close()

    # ClientIP affinity (persistence) with maglev (mh); a drain that ends by its timeout.
    p3_endpoints = [(NAT_BACKENDS[n], BACKEND_PORT, 1) for n in ("be1", "be2", "be3")]
    p3 = make_plan(
        "sticky",
        NAT_VIP2,
        api.Architecture.nat,
        p3_endpoints,
        algorithm=api.Algorithm.maglev,
        affinity=api.AffinityType.ClientIP,
    )
    sticky = LB("lb", ipvs_engine.IpvsEngine(drain_seconds=4, full_check_seconds=0))
    found["sticky_sync"] = sticky.sync(p3, targets_of(p3))
    found["sticky_table"] = table("lb", NAT_VIP2)
    found["engine_view_sticky"] = engine_table("lb", NAT_VIP2)
    # A hand edit that /proc does not show (the scheduler flag): the settings check (here at every sync)
    # sees it, and the sync puts the flag back.
    sticky_service = f"{NAT_VIP2}:{NAT_PORT}"
    run(["ipvsadm", "-E", "-t", sticky_service, "-s", "mh", "-p", "600"], "lb")
    found["sticky_flag_edited"] = table("lb", NAT_VIP2)[f"TCP {sticky_service}"]["flags"]
    found["sticky_flag_sync"] = sticky.sync(p3, targets_of(p3))
    found["sticky_flag_resync"] = sticky.sync(p3, targets_of(p3))
    found["sticky_flag_restored"] = table("lb", NAT_VIP2)[f"TCP {sticky_service}"]["flags"]
    found["sticky_kernel_lines"] = saved("lb", NAT_VIP2)
    found["sticky_render_lines"] = rendered(p3)
    found["expire_quiescent_template"] = read_sysctl("lb", "net.ipv4.vs.expire_quiescent_template")
    found["sticky_spread"], _ = client.spread(NAT_VIP2, NAT_PORT, 8)
    chosen = next(iter(found["sticky_spread"]))
    pinned = client.connect_to(NAT_VIP2, NAT_PORT, chosen)
    rest = [e for e in p3_endpoints if e[0] != NAT_BACKENDS[chosen]]
    p4 = make_plan(
        "sticky",
        NAT_VIP2,
        api.Architecture.nat,
        rest,
        algorithm=api.Algorithm.maglev,
        affinity=api.AffinityType.ClientIP,
        generation=2,
    )
    found["sticky_drain_sync"] = sticky.sync(p4, targets_of(p4))
    found["sticky_spread_draining"], _ = client.spread(NAT_VIP2, NAT_PORT, 4)
    chosen_server = f"{NAT_BACKENDS[chosen]}:{BACKEND_PORT}"

    def chosen_deleted() -> bool:
        sticky.sync(p4, targets_of(p4))
        return chosen_server not in table("lb", NAT_VIP2)[f"TCP {NAT_VIP2}:{NAT_PORT}"]["servers"]

    found["sticky_active_before_timeout"] = table("lb", NAT_VIP2)[f"TCP {NAT_VIP2}:{NAT_PORT}"]["servers"][
        chosen_server
    ]["active"]
    found["sticky_deleted_after"] = wait_until(chosen_deleted, timeout=30)
    pinned.close()

    found["foreign_after_syncs"] = saved("lb", FOREIGN_VIP) + saved("lb", "-f 7")
    found["refused"] = refused_changes("lb")
    found["ipv6"] = ipv6_programming("lb")
    restarted.remove(p2)
    sticky.remove(p4)
    found["table_after_remove"] = table("lb")
    found["vips_on_lo_after_remove"] = [a for a in addresses("lb", "lo") if a["local"] in (NAT_VIP, NAT_VIP2)]
    found["foreign_after_remove"] = saved("lb", FOREIGN_VIP) + saved("lb", "-f 7")
    found["nftables"] = nftables_parity()
    return found


def refused_changes(ns: str) -> Findings:
    """Changes the kernel refuses (a service that exists, a real server that does not) among ones it
    accepts: the error names each refused change and why, and the accepted ones are in place."""
    found: Findings = {}
    key = ipvs_table.ServiceKey("TCP", SCRATCH_VIP, 80)
    service = ipvs_table.VirtualService(key, "rr", None)
    server = ipvs_table.RealServer("10.0.2.11", 8080, "-m", 1)
    changes = [
        ipvs_table.Change("-A", key, service),
        ipvs_table.Change("-A", key, service),
        ipvs_table.Change("-a", key, server=server),
        ipvs_table.Change("-d", key, server=ipvs_table.RealServer("10.0.2.99", 8080, "-m", 1)),
    ]
    with netns(ns):
        try:
            ipvs_engine.IpvsEngine()._apply(changes)
            found["error"] = None
        except ipvs_table.IpvsError as error:
            found["error"] = str(error)
    found["table"] = table(ns, SCRATCH_VIP)
    run(["ipvsadm", "-D", "-t", f"{SCRATCH_VIP}:80"], ns)
    return found


def ipv6_programming(ns: str) -> Findings:
    """An IPv6 VIP with TCP and UDP listeners and persistence: what the kernel holds (by ipvsadm) and
    what the engine reads, a no-op re-sync, and removal. No traffic: the packets are the IPv4 tests';
    this proves the IPv6 encoding of services, real servers and the persistence netmask."""
    vip = "fd00:100::1"
    p = make_plan(
        "v6",
        vip,
        api.Architecture.nat,
        [("fd00:2::11", 8080, 1), ("fd00:2::12", 8080, 3)],
        listeners=(("tcp", 443, "TCP"), ("dns", 53, "UDP")),
        algorithm=api.Algorithm.source_hash,
        affinity=api.AffinityType.ClientIP,
    )
    lb = LB(ns, ipvs_engine.IpvsEngine())
    found: Findings = {"sync": lb.sync(p, targets_of(p))}
    found["table"] = table(ns, vip)
    found["engine_view"] = engine_table(ns, vip)
    found["kernel_lines"] = saved(ns, "fd00:100::1")
    found["render_lines"] = rendered(p)
    found["resync"] = lb.sync(p, targets_of(p))
    lb.remove(p)
    found["table_after_remove"] = table(ns, vip)
    return found


def nftables_parity() -> Findings:
    """The nftables engine once in this kernel too (nat), so both engines are checked on Debian's kernel."""
    try:
        from layerlb_dataplane.kernel import nftables
    except ImportError as error:  # the other engine is optional here; say so rather than fail the IPVS test
        return {"available": False, "reason": str(error)}
    found: Findings = {"available": True}
    backends = {"nb1": "10.0.2.11", "nb2": "10.0.2.12"}
    nat_topology("n", backends)
    servers = [Backend(name, f"n{name}", BACKEND_PORT) for name in backends]
    p = make_plan(
        "web",
        NAT_VIP,
        api.Architecture.nat,
        [(address, BACKEND_PORT, 1) for address in backends.values()],
        engine=api.Engine.nftables,
    )
    with netns("nlb"):  # libnftables' netlink socket belongs to the namespace the engine is made in
        engine = nftables.NftablesEngine()
    lb = LB("nlb", engine)
    found["first_sync"] = lb.sync(p, targets_of(p))
    try:
        found["spread"], found["peers"] = Client("nc").spread(NAT_VIP, NAT_PORT, 10)
    except OSError as error:
        found["error"] = repr(error)
        found["ruleset"] = run(["nft", "list", "ruleset"], "nlb")
        found["lo"] = addresses("nlb", "lo")
        found["modules"] = run(["cat", "/proc/modules"]).split("\n")
        found["dmesg"] = run(["dmesg"])[-3000:]
        return found
    found["resync"] = lb.sync(p, targets_of(p))
    lb.remove(p)
    found["tables_after_remove"] = run(["nft", "list", "tables"], "nlb").split()
    del servers
    return found


# --- dsr and tunnel ------------------------------------------------------------------------------------

DSR_VIP, DSR_CLIENT, DSR_LB = "10.0.3.100", "10.0.3.2", "10.0.3.1"
DSR_BACKENDS = {"be1": "10.0.3.11", "be2": "10.0.3.12"}
TUNNEL_VIP, TUNNEL_CLIENT = "10.0.100.10", "10.0.4.2"
TUNNEL_BACKENDS = {"be1": "10.0.5.11", "be2": "10.0.5.12"}
DIRECT_PORT = 80
DOWNLOAD = 2_000_000
ARP_SYSCTLS = {
    "net.ipv4.conf.all.arp_ignore": "1",
    "net.ipv4.conf.all.arp_announce": "2",
    "net.ipv4.conf.eth0.arp_ignore": "1",
    "net.ipv4.conf.eth0.arp_announce": "2",
}


def direct_return(found: Findings, p: plan.Plan, lb: LB, client: Client, vip: str) -> None:
    """The checks dsr and tunnel share: spread, client address seen, replies bypassing the LB, idempotence."""
    found["first_sync"] = lb.sync(p, targets_of(p))
    found["table"] = table("lb", vip)
    found["kernel_lines"] = saved("lb", vip)
    found["render_lines"] = rendered(p)
    found["vip_on_lb_eth0"] = [a for a in addresses("lb", "eth0") if a["local"] == vip]
    found["spread"], found["peers"] = client.spread(vip, DIRECT_PORT, 20)
    connection = client.connect(vip, DIRECT_PORT)
    found["download_backend"] = connection.ask()[0]
    lb_before, client_before = device_counters("lb", "eth0"), device_counters("c", "eth0")
    found["downloaded"] = connection.big(DOWNLOAD)
    lb_after, client_after = device_counters("lb", "eth0"), device_counters("c", "eth0")
    connection.close()
    found["lb_rx_bytes_during_download"] = lb_after["rx_bytes"] - lb_before["rx_bytes"]
    found["lb_tx_bytes_during_download"] = lb_after["tx_bytes"] - lb_before["tx_bytes"]
    found["client_rx_bytes_during_download"] = client_after["rx_bytes"] - client_before["rx_bytes"]
    service = f"TCP {shared.host_port(vip, DIRECT_PORT)}"
    # IPVS folds its per-CPU counters into what it reports every 2 s: wait for all 21 connections.
    wait_until(lambda: ipvs_stats("lb", vip)[service]["conns"] >= 21, timeout=20)
    found["stats"] = ipvs_stats("lb", vip)
    found["guard_vip"] = client.outcome(vip, NODE_SERVICE_PORT)  # dsr: the LB node serves that port itself
    found["resync"] = lb.sync(p, targets_of(p))
    restarted = LB("lb", ipvs_engine.IpvsEngine())
    found["restart_sync"] = restarted.sync(p, targets_of(p))
    restarted.remove(p)
    found["table_after_remove"] = table("lb", vip)
    found["vip_on_lb_eth0_after_remove"] = [a for a in addresses("lb", "eth0") if a["local"] == vip]


def scenario_dsr() -> Findings:
    """IPVS direct routing on one L2 segment: backends own the VIP on lo and answer the client directly."""
    found: Findings = {}
    names = ["c", "lb", *DSR_BACKENDS]
    ip_batch(
        ["netns add sw", *(f"netns add {n}" for n in names)]
        + [f"link add eth0 netns {n} type veth peer name p{n} netns sw" for n in names]
    )
    ip_batch(
        [
            "link add br0 type bridge",
            "link set br0 up",
            *(f"link set p{n} master br0" for n in names),
            *(f"link set p{n} up" for n in names),
        ],
        "sw",
    )
    own = {"c": DSR_CLIENT, "lb": DSR_LB, **DSR_BACKENDS}
    for name in names:
        ip_batch(["link set lo up", "link set eth0 up", f"addr add {own[name]}/24 dev eth0"], name)
    for name in DSR_BACKENDS:
        sysctls(name, ARP_SYSCTLS)
        ip_batch([f"addr add {DSR_VIP}/32 dev lo"], name)
    servers = [Backend(name, name, DIRECT_PORT) for name in DSR_BACKENDS]
    servers.append(Backend("node", "lb", NODE_SERVICE_PORT))  # the LB node's own service (the VIP guard)
    endpoints = [(address, None, 1) for address in DSR_BACKENDS.values()]
    p = make_plan("direct", DSR_VIP, api.Architecture.dsr, endpoints)
    direct_return(found, p, LB("lb", ipvs_engine.IpvsEngine()), Client("c"), DSR_VIP)
    found["guard_node_address"] = Client("c").outcome(DSR_LB, NODE_SERVICE_PORT)
    neighbours = json.loads(run(["ip", "-j", "neigh", "show", DSR_VIP], "c") or "[]")
    found["client_vip_mac"] = neighbours[0].get("lladdr") if neighbours else None
    found["lb_mac"] = mac_of("lb", "eth0")
    del servers
    return found


def scenario_tunnel() -> Findings:
    """IPVS IP-in-IP: the backends are on another network behind a router; they decapsulate on tunl0,
    own the VIP on lo, and answer the client directly through the router."""
    found: Findings = {}
    ip_batch(
        ["netns add r", "netns add c", "netns add lb", *(f"netns add {n}" for n in TUNNEL_BACKENDS)]
        + [
            "link add eth0 netns c type veth peer name rc netns r",
            "link add eth0 netns lb type veth peer name rl netns r",
        ]
        + [f"link add eth0 netns {n} type veth peer name p{n} netns r" for n in TUNNEL_BACKENDS]
    )
    router = [
        "link set lo up",
        "link add br0 type bridge",
        "link set br0 up",
        "addr add 10.0.5.254/24 dev br0",
    ]
    router += [
        "link set rc up",
        "addr add 10.0.4.254/24 dev rc",
        "link set rl up",
        "addr add 10.0.6.254/24 dev rl",
    ]
    router += [line for n in TUNNEL_BACKENDS for line in (f"link set p{n} master br0", f"link set p{n} up")]
    ip_batch([*router, f"route add {TUNNEL_VIP}/32 via 10.0.6.1"], "r")
    sysctls("r", {"net.ipv4.ip_forward": "1"})
    ip_batch(
        [
            "link set lo up",
            "link set eth0 up",
            f"addr add {TUNNEL_CLIENT}/24 dev eth0",
            "route add default via 10.0.4.254",
        ],
        "c",
    )
    ip_batch(
        [
            "link set lo up",
            "link set eth0 up",
            "addr add 10.0.6.1/24 dev eth0",
            "route add default via 10.0.6.254",
        ],
        "lb",
    )
    for name, address in TUNNEL_BACKENDS.items():
        ip_batch(
            [
                "link set lo up",
                "link set eth0 up",
                "link set tunl0 up",
                f"addr add {address}/24 dev eth0",
                "route add default via 10.0.5.254",
                f"addr add {TUNNEL_VIP}/32 dev lo",
            ],
            name,
        )
        rp = {f"net.ipv4.conf.{d}.rp_filter": "0" for d in ("all", "default", "eth0", "tunl0")}
        sysctls(name, {**ARP_SYSCTLS, **rp})
    servers = [Backend(name, name, DIRECT_PORT) for name in TUNNEL_BACKENDS]
    tunl0_before = {name: device_counters(name, "tunl0")["rx_packets"] for name in TUNNEL_BACKENDS}
    endpoints = [(address, None, 1) for address in TUNNEL_BACKENDS.values()]
    p = make_plan("tunnelled", TUNNEL_VIP, api.Architecture.tunnel, endpoints)
    direct_return(found, p, LB("lb", ipvs_engine.IpvsEngine()), Client("c"), TUNNEL_VIP)
    found["tunl0_rx_packets"] = {
        name: device_counters(name, "tunl0")["rx_packets"] - tunl0_before[name] for name in TUNNEL_BACKENDS
    }
    del servers
    return found


# --- bench ---------------------------------------------------------------------------------------------

BENCH_SERVICES, BENCH_SERVERS = 1000, 10


def _emulation_probe() -> float:
    """A fixed piece of pure Python work; the host runs it too, and the ratio is the emulation factor."""
    started = time.perf_counter()
    total = 0
    for number in range(2_000_000):
        total += number % 7
    return time.perf_counter() - started


def _timed(work: Callable[[], object], rounds: int = 3) -> float:
    """The median seconds of `rounds` runs of `work`."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_plan(vip: str, engine: api.Engine = api.Engine.ipvs) -> plan.Plan:
    """One LoadBalancer of BENCH_SERVICES listeners, each to the same BENCH_SERVERS weighted endpoints."""
    endpoints = [(f"10.9.0.{n}", 8080, 1 + n % 3) for n in range(1, BENCH_SERVERS + 1)]
    listeners = [(f"l{n}", 20000 + n, "TCP") for n in range(BENCH_SERVICES)]
    return make_plan("bench", vip, api.Architecture.nat, endpoints, listeners=listeners, engine=engine)


def nftables_bench(namespace: str) -> Findings:
    """The bench Plan synced by the nftables engine, in a namespace of its own. The host test runs this
    too: guest time / host time is an emulation factor for kernel-heavy work (netlink, the kernel
    building and checking rules), to set beside the pure-Python one when estimating native IPVS figures."""
    from layerlb_dataplane.kernel import nftables

    ip_batch([f"netns add {namespace}"])
    try:
        ip_batch(["link set lo up"], namespace)
        p = bench_plan("10.0.201.1", api.Engine.nftables)
        with netns(namespace):
            engine = nftables.NftablesEngine()  # libnftables binds its socket where it is made
            first = engine.sync(p, {})
            noops = [engine.sync(p, {}) for _ in range(3)]
            engine.remove(p)
    finally:
        ip_batch([f"netns del {namespace}"])
    return {
        "first_seconds": first.seconds,
        "first_changes": first.changes,
        "noop_seconds": statistics.median(s.seconds for s in noops),
        "noop_changes": [s.changes for s in noops],
    }


def scenario_bench() -> Findings:
    """A sync of 1,000 virtual services x 10 real servers, then no-op re-syncs, timed inside the guest."""
    found: Findings = {}
    ip_batch(["netns add bench"])
    ip_batch(["link set lo up"], "bench")
    p = bench_plan("10.0.200.1")
    targets = targets_of(p)
    lb = LB("bench", ipvs_engine.IpvsEngine())
    found["emulation_probe_seconds"] = _emulation_probe()
    found["first_sync"] = lb.sync(p, targets)
    found["noop_syncs"] = [lb.sync(p, targets) for _ in range(5)]
    found["noop_median_seconds"] = statistics.median(s["seconds"] for s in found["noop_syncs"])
    # The full path: a new engine's first sync (as after a restart: the desired state computed, the table
    # read and compared), then the periodic full check (desired state cached, the table read again).
    restarted = [LB("bench", ipvs_engine.IpvsEngine(full_check_seconds=0)) for _ in range(3)]
    found["restart_syncs"] = [engine.sync(p, targets) for engine in restarted]
    found["restart_median_seconds"] = statistics.median(s["seconds"] for s in found["restart_syncs"])
    found["full_noop_syncs"] = [restarted[0].sync(p, targets) for _ in range(3)]
    found["full_noop_median_seconds"] = statistics.median(s["seconds"] for s in found["full_noop_syncs"])
    vip = "10.0.200.1"
    with netns("bench"):
        found["read_netlink_seconds"] = _timed(lambda: ipvs_engine.IpvsEngine().read(vip))
        found["read_proc_seconds"] = _timed(
            lambda: ipvs_proc.servers(Path("/proc/thread-self/net/ip_vs").read_text(), vip)
        )
        found["desired_seconds"] = _timed(lambda: ipvs_desired.services(p, targets))
        started = time.perf_counter()
        listing = subprocess.run(
            ["ipvsadm", "-Ln", "--exact"], capture_output=True, text=True, check=True
        ).stdout
        found["read_ipvsadm_seconds"] = time.perf_counter() - started
    parsed = parse_listing(listing)  # what ipvsadm sees: the whole table is there
    found["kernel_services"] = len(parsed)
    found["kernel_servers"] = sum(len(s.servers) for s in parsed.values())
    targets["app"][0].health.healthy = False
    found["health_change_sync"] = lb.sync(p, targets)
    found["emulation_probe_seconds_after"] = _emulation_probe()
    lb.remove(p)
    found["nftables"] = nftables_bench("nftbench")
    return found


SCENARIOS: dict[str, Callable[[], Findings]] = {
    "nat": scenario_nat,
    "dsr": scenario_dsr,
    "tunnel": scenario_tunnel,
    "bench": scenario_bench,
}


def record(scenario: Callable[[], Findings], result_path: str) -> int:
    """Runs `scenario` and writes its findings (or the error) as JSON to `result_path`: the one way a guest
    scenario reports to the host (this module's and `guest_ecmp`'s)."""
    started = time.monotonic()
    try:
        findings = scenario()
    except BaseException:
        findings = {"error": traceback.format_exc()}
    findings["scenario_seconds"] = round(time.monotonic() - started, 2)
    with open(result_path, "w") as out:
        json.dump(findings, out, indent=1, sort_keys=True, default=str)
    return 0 if "error" not in findings else 1


def main(argv: Sequence[str]) -> int:
    """Runs one scenario and writes its findings (or the error) as JSON to the given path."""
    name, result_path = argv
    return record(SCENARIOS[name], result_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

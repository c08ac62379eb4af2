"""The pod runner's network: a small routed lab of network namespaces standing in for a cluster's network.

    client (172.31.0.2) ── router ── bridge "lan" 172.30.0.0/16 ── nodes    172.30.1.N  (host-network pods)
                          (fabric)                            ├── pods     172.30.2.N  (one netns each)
                          10.0.0.1 on lo: the API relay       └── backends 172.30.3.N

The router (namespace "fabric") owns the bridge, the client's link and, on its loopback, the first
Service address (10.0.0.1, a SAN of the API server's certificate), where the runner's relay forwards to
the real API server on the host's loopback. Every other namespace routes by default through the router.
A VIP is routed by the router to the pods that serve it, as a BGP-announcing network would (ECMP when
several do); the client is on its own subnet, so what it sees has really crossed a router. Backends share
the L2 segment with nodes and pods (direct server return needs that).

Nothing here touches the host's own network: the relay's listening socket is opened from a thread that
entered the router's namespace (`in_namespace`), so the runner itself stays in the root namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, TypeVar

from tests.netns import Namespace, NetnsError, Topology

T = TypeVar("T")

LAN: Final = ipaddress.ip_network("172.30.0.0/16")
ROUTER_LAN: Final = "172.30.0.1"
NODES: Final = ipaddress.ip_network("172.30.1.0/24")
PODS: Final = ipaddress.ip_network("172.30.2.0/24")
BACKENDS: Final = ipaddress.ip_network("172.30.3.0/24")
CLIENTS: Final = ipaddress.ip_network("172.31.0.0/24")
ROUTER_CLIENT: Final = "172.31.0.1"
CLIENT: Final = "172.31.0.2"
BRIDGE: Final = "lan"

_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter(namespace: str) -> None:
    """Moves the calling thread (only it) into network namespace `namespace` (an `ip netns` name)."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
    finally:
        os.close(fd)


def in_namespace(namespace: str, work: Callable[[], T]) -> T:
    """`work()` run in a short-lived thread inside `namespace`: sockets it opens belong to that namespace
    for their whole life, whichever thread uses them later."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            enter(namespace)
            outcome.append(work())
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=target, name=f"netns-{namespace}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


class _Addresses:
    """Hands out the host addresses of one subnet, reusing released ones last."""

    def __init__(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.free = [str(host) for host in network.hosts()][1:]  # .1 stays unused
        self.network = network

    def take(self) -> str:
        if not self.free:
            raise NetnsError(f"no free address left in {self.network}")
        return self.free.pop(0)

    def give_back(self, address: str) -> None:
        self.free.append(address)


@dataclass(eq=False)
class Host:
    """A namespace on the lab's L2 segment: a node, a pod or a backend."""

    namespace: Namespace
    address: str
    port: str  # its interface's name on the bridge, in the router's namespace

    @property
    def name(self) -> str:
        assert self.namespace.name is not None
        return self.namespace.name


@dataclass(eq=False)
class Lab:
    """The namespaces and routes of one runner; `close()` removes all of it."""

    tag: str = "lab"
    topology: Topology = field(init=False)
    router: Namespace = field(init=False)
    client: Namespace = field(init=False)
    _addresses: dict[str, _Addresses] = field(init=False)
    _ports: Iterator[int] = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _routes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.topology = Topology(self.tag, timeout=60)
        self._addresses = {
            "node": _Addresses(NODES),
            "pod": _Addresses(PODS),
            "backend": _Addresses(BACKENDS),
        }
        self._ports = iter(range(1, 1_000_000))
        try:
            self.router = self.topology.namespace("fabric")
            self.router.ip("link", "add", BRIDGE, "type", "bridge")
            self.router.addr(BRIDGE, f"{ROUTER_LAN}/{LAN.prefixlen}")
            self.router.ip("addr", "add", "10.0.0.1/32", "dev", "lo")
            for key in ("net.ipv4.ip_forward", "net.ipv4.conf.all.send_redirects"):
                self.router.sysctl(key, 1 if key.endswith("forward") else 0)
            self.router.sysctl("net.ipv4.conf.default.send_redirects", 0)
            self.client = self.topology.namespace("client")
            self.topology.link(self.router, "client0", self.client, "eth0")
            self.router.addr("client0", f"{ROUTER_CLIENT}/{CLIENTS.prefixlen}")
            self.client.addr("eth0", f"{CLIENT}/{CLIENTS.prefixlen}")
            self.client.route(f"default via {ROUTER_CLIENT}")
        except BaseException:
            self.topology.close()
            raise

    def close(self) -> None:
        self.topology.close()

    def attach(self, kind: str, short: str) -> Host:
        """A new namespace of `kind` (node, pod, backend) on the L2 segment, routed through the router."""
        with self._lock:
            address = self._addresses[kind].take()
            port = f"{kind[0]}{next(self._ports)}"
        try:
            namespace = self.topology.namespace(short)
        except BaseException:
            self._addresses[kind].give_back(address)
            raise
        host = Host(namespace, address, port)
        try:
            self.topology.link(self.router, port, namespace, "eth0")
            self.router.ip("link", "set", port, "master", BRIDGE)
            namespace.addr("eth0", f"{address}/{LAN.prefixlen}")
            namespace.route(f"default via {ROUTER_LAN}")
            # Forwarding nodes send packets back out of the interface they came in: no ICMP redirects.
            for scope in ("all", "default", "eth0"):
                namespace.sysctl(f"net.ipv4.conf.{scope}.send_redirects", 0)
        except BaseException:
            self.detach(host, kind)
            raise
        return host

    def detach(self, host: Host, kind: str) -> None:
        """Deletes a namespace made by `attach` (its processes killed, its veth gone with it)."""
        with contextlib.suppress(ValueError):
            self.topology.remove(host.namespace)
        with self._lock:
            self._addresses[kind].give_back(host.address)

    def backend(self, short: str) -> Host:
        """A namespace for a backend server, on the L2 segment."""
        return self.attach("backend", short)

    def route_vip(self, vip: str, next_hops: tuple[str, ...]) -> None:
        """Routes `vip` at the router to `next_hops` (ECMP when several; none: the route goes)."""
        hops = tuple(sorted(next_hops))
        with self._lock:
            if self._routes.get(vip, ()) == hops:
                return
            prefix = f"{vip}/{128 if ':' in vip else 32}"
            if not hops:
                self.router.ip("route", "del", prefix)
                del self._routes[vip]
                return
            if len(hops) == 1:
                self.router.ip("route", "replace", prefix, "via", hops[0])
            else:
                nexthops = [word for hop in hops for word in ("nexthop", "via", hop)]
                self.router.ip("route", "replace", prefix, *nexthops)
            self._routes[vip] = hops

    def routes(self) -> dict[str, tuple[str, ...]]:
        """The VIP routes the router holds now: VIP → next hops."""
        with self._lock:
            return dict(self._routes)

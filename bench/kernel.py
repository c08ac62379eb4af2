"""The kernel path's bench rows, so nftables DNAT is compared with a direct connection over the
very same network-namespace topology, not with loopback:

    client ns (wrk) --veth-- LB ns (forwards; nftables nat) --veth-- backend ns (nginx)
    10.201.1.2       10.201.1.1 | 10.201.2.1                  10.201.2.2

"direct" is wrk to the backend's own address, routed through the LB namespace without DNAT; "kernel"
is wrk to the VIP 10.201.3.100, which the LB namespace DNATs to the backend. The LB namespace is
programmed by `layerlb serve` of an `L4 nat` resource with `engine: nftables`; while that cannot run
yet, by the same ruleset `layerlb render --format nftables` prints, loaded with `nft -f` (the row says
which). The backend routes replies back through the LB, so conntrack un-DNATs them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import processes, resources, subjects
from bench.processes import Pinning, Process, Unavailable

CLIENT, LB_IN, LB_OUT, BACKEND = "10.201.1.2", "10.201.1.1", "10.201.2.1", "10.201.2.2"
VIP = "10.201.3.100"
PORT = 8080


@dataclass
class Topology:
    """Three namespaces joined by two veth pairs; `close` removes them and what runs in them."""

    tag: str
    started: list[Process] = field(default_factory=list)
    made: list[str] = field(default_factory=list)

    def name(self, role: str) -> str:
        return f"llbb-{os.getpid()}-{self.tag}-{role}"

    @property
    def client(self) -> str:
        return self.name("client")

    @property
    def lb(self) -> str:
        return self.name("lb")

    @property
    def backend(self) -> str:
        return self.name("backend")

    def exec_prefix(self, namespace: str) -> list[str]:
        return [processes.require("ip", "iproute2"), "netns", "exec", namespace]

    def ip(self, *argv: str) -> None:
        result = processes.run_quiet([processes.require("ip", "iproute2"), *argv])
        if result.returncode != 0:
            raise Unavailable(f"`ip {' '.join(argv)}` failed: {result.stderr.strip()}")

    def create(self) -> None:
        """Make the namespaces, links, addresses and routes; forwarding on in the LB namespace."""
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        for namespace in (self.client, self.lb, self.backend):
            self.ip("netns", "add", namespace)
            self.made.append(namespace)
            self.ip("-n", namespace, "link", "set", "lo", "up")
        self.ip(
            "-n", self.lb, "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", self.client
        )
        self.ip(
            "-n", self.lb, "link", "add", "b0", "type", "veth", "peer", "name", "eth0", "netns", self.backend
        )
        for namespace, device, address in (
            (self.client, "eth0", f"{CLIENT}/24"),
            (self.lb, "c0", f"{LB_IN}/24"),
            (self.lb, "b0", f"{LB_OUT}/24"),
            (self.backend, "eth0", f"{BACKEND}/24"),
        ):
            self.ip("-n", namespace, "addr", "add", address, "dev", device)
            self.ip("-n", namespace, "link", "set", device, "up")
        self.ip("-n", self.client, "route", "add", "default", "via", LB_IN)
        self.ip("-n", self.backend, "route", "add", "default", "via", LB_OUT)
        sysctl = processes.run_quiet([*self.exec_prefix(self.lb), "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        if sysctl.returncode != 0:
            raise Unavailable(f"cannot enable forwarding in the LB namespace: {sysctl.stderr.strip()}")

    def probe(self, host: str, port: int) -> tuple[int, int]:
        """One HTTP request from the client namespace: (status, body length); (0, 0) when it fails."""
        code = (
            "import sys; from bench import processes\n"
            "try:\n s, b = processes.http_get(sys.argv[1], int(sys.argv[2]), timeout=1.0); print(s, len(b))\n"
            "except OSError: print(0, 0)\n"
        )
        result = processes.run_quiet(
            [*self.exec_prefix(self.client), sys.executable, "-c", code, host, str(port)]
        )
        parts = result.stdout.split()
        return (int(parts[0]), int(parts[1])) if len(parts) == 2 else (0, 0)

    def close(self) -> None:
        for process in reversed(self.started):
            process.stop(timeout=3)
        for namespace in reversed(self.made):
            processes.run_quiet([processes.require("ip", "iproute2"), "netns", "del", namespace])
        self.made.clear()


def remove_stale() -> None:
    """Delete namespaces left by bench runs that were killed (their pid, in the name, is gone)."""
    ip = processes.tool("ip")
    if ip is None:
        return
    for line in processes.run_quiet([ip, "netns", "list"]).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(r"^llbb-(\d+)-", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            processes.run_quiet([ip, "netns", "del", name])


@contextlib.contextmanager
def topology(folder: Path, logs: Path, pinning: Pinning) -> Iterator[Topology]:
    """The topology with nginx serving in the backend namespace (pinned like every subject)."""
    processes.require("ip", "iproute2")
    remove_stale()
    topo = Topology("k")
    try:
        topo.create()
        nginx = subjects.start_nginx(
            folder, 90, BACKEND, PORT, pinning.subject, logs, prefix=topo.exec_prefix(topo.backend)
        )
        topo.started.append(nginx)
        processes.wait_until(
            lambda: topo.probe(BACKEND, PORT)[0] == 200, 15, "nginx in the backend namespace", nginx
        )
        yield topo
    finally:
        topo.close()


def _layerlb_tables(topo: Topology) -> bool:
    """Whether the LB namespace holds an nftables table of layerlb's (whatever the engine names it)."""
    nft = processes.require("nft", "nftables")
    listed = processes.run_quiet([*topo.exec_prefix(topo.lb), nft, "list", "tables"])
    return listed.returncode == 0 and "layerlb" in listed.stdout


def _remove_layerlb_tables(topo: Topology) -> None:
    nft = processes.require("nft", "nftables")
    listed = processes.run_quiet([*topo.exec_prefix(topo.lb), nft, "list", "tables"])
    for line in listed.stdout.splitlines():
        words = line.split()  # "table ip NAME"
        if len(words) == 3 and words[0] == "table" and "layerlb" in words[2]:
            processes.run_quiet([*topo.exec_prefix(topo.lb), nft, "delete", "table", words[1], words[2]])


def program(topo: Topology, folder: Path, logs: Path, pinning: Pinning) -> tuple[str, Callable[[], None]]:
    """Program DNAT in the LB namespace; (how it was programmed, a function that undoes it)."""
    nft = processes.require("nft", "nftables")
    resource = resources.kernel_nat(VIP, PORT, BACKEND, PORT)
    path = subjects.write_resource(folder, "kernel", resource)

    def works() -> bool:
        return _layerlb_tables(topo) and topo.probe(VIP, PORT)[0] == 200

    why_not_serve = ""
    try:
        server = subjects.start_layerlb(
            path,
            logs,
            pinning.subject,
            processes.free_port(),
            name="layerlb-kernel",
            prefix=topo.exec_prefix(topo.lb),
        )
    except Unavailable as error:
        why_not_serve = str(error)
    else:
        topo.started.append(server)
        try:
            processes.wait_until(works, 20, "layerlb serve programming nftables in the LB namespace", server)

            def stop_and_flush() -> None:
                # layerlb keeps kernel state on exit (by design); remove it, or its conntrack and NAT
                # hooks would tax the next round's direct row.
                server.stop()
                _remove_layerlb_tables(topo)

            return "layerlb serve (engine nftables)", stop_and_flush
        except Unavailable as error:
            why_not_serve = str(error)
            server.stop()
    ruleset = subjects.render(path, "nftables")
    named = re.search(r"(?m)^table ip (\S+) \{", ruleset)
    if named is None:
        raise Unavailable("layerlb's nftables render holds no `table ip NAME {`")
    table = named.group(1)
    loaded = processes.run_quiet([*topo.exec_prefix(topo.lb), nft, "-f", "-"], stdin=ruleset.encode())
    if loaded.returncode != 0:
        raise Unavailable(f"nft -f refused layerlb's nftables render: {loaded.stderr.strip()[-300:]}")
    processes.wait_until(works, 10, "DNAT through the VIP")

    def undo() -> None:
        processes.run_quiet([*topo.exec_prefix(topo.lb), nft, "delete", "table", "ip", table])

    return f"`layerlb render --format nftables | nft -f -` (layerlb serve unavailable: {why_not_serve})", undo

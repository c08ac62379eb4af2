"""Real Kubernetes nodes on one machine: each a network namespace with its own containerd, kubelet and
kube-proxy, registered with the local control plane (``cluster.py``).

    host (root netns)                      network namespace NET (bridge br0, 172.28.0.1, fd00:28::1)
      kube-apiserver 127.0.0.1:PORT  ◀──── api.sock ◀── socat in every node: 0.0.0.0:6443
      egress selector (HTTPConnect) ─────▶ egress.sock ──▶ egress.py (CONNECT proxy) ──▶ kubelets :10250
                                           node1 172.28.0.11 fd00:28::11  pods 10.244.1.0/24 fd00:244:1::/64
                                           node2 172.28.0.12 fd00:28::12  pods 10.244.2.0/24 fd00:244:2::/64
                                           client 172.28.0.100 fd00:28::100 (a LAN machine, no node)

A node is: a network namespace on the bridge (routes to the other nodes' pod CIDRs), containerd with its
own root, state, socket and CNI folder (standard CNI plugins: bridge + host-local + portmap), a kubelet
(cgroupfs driver, its own cgroup root in every hierarchy, its own root-dir and pod-log folder) and a
kube-proxy (nftables mode). The API server is reached through a relay in each node on port 6443, which
the in-cluster ``kubernetes`` Service's EndpointSlice names, so pods reach it at 10.0.0.1:443.

The cluster is dual-stack, IPv4 first: nodes, pods and the LAN have an address of each family (Node
InternalIPs and pod IPs IPv4 then IPv6; a Service that asks nothing stays IPv4 single-stack), and
kube-proxy serves both. IPv6 duplicate address detection and router advertisements are off in every
namespace made here (and in pods, the bridge plugin's default), so an address is usable the moment it is
added: nothing else on these links could hold it, and nobody sends router advertisements. Nor ICMP
redirects (see ``QUIET_LINKS``).

Processes are started with ``nsenter --net`` rather than ``ip netns exec``: the latter remounts /sys
(hiding the cgroup mounts from the kubelet) and gives a private mount namespace (so the kubelet's volume
mounts would be invisible to runc). Root here lacks CAP_SYS_RESOURCE, hence ``restrict_oom_score_adj``
in containerd and ``oomScoreAdj: 0`` for kubelet and kube-proxy.

``remove(state)`` undoes everything a node changes on the host: its processes (and the containers'),
pod network namespaces, mounts under the state folder, cgroups, the sysctls the kubelet sets, the CNI
cache files and ``/var/log/containers`` links. It works from the state file alone, so a run that was
killed is cleaned up by the next (see ``cluster.remove_stale``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

NODE_SUBNET = "172.28.0.0/24"
NETWORK_IP = "172.28.0.1"
# A machine on the nodes' LAN, outside the cluster: what a user's client is (its own namespace).
CLIENT_IP = "172.28.0.100"
# Addresses of the nodes' LAN kept for VIPs, as a bare-metal administrator reserves a range of the node
# subnet for an L2 load balancer: the LAN's hosts reach them on-link, asking by ARP (the speaker answers).
LAN_VIPS = "172.28.0.200-172.28.0.250"
POD_CIDR = "10.244.0.0/16"
# The same LAN and pod network in IPv6 (node N at fd00:28::1N, its pods in fd00:244:N::/64).
NODE_SUBNET6 = "fd00:28::/64"
NETWORK_IP6 = "fd00:28::1"
CLIENT_IP6 = "fd00:28::100"
LAN_VIPS6 = "fd00:28::200-fd00:28::250"  # as LAN_VIPS: the LAN's hosts find them by NDP
POD_CIDR6 = "fd00:244::/48"
API_RELAY_PORT = 6443
CGROUP_ROOT = Path("/sys/fs/cgroup")
NODE_CPU_SHARES = 4096
CNI_BIN = Path("/usr/lib/cni")
CONTAINER_LOGS = Path("/var/log/containers")
CNI_CACHE = Path("/var/lib/cni/results")
NETNS_DIR = Path("/run/netns")
# Host-global knobs the kubelet sets at start (protectKernelDefaults: false); put back by `remove`.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
PAUSE_IMAGE = "localhost/pause:3.10"
# Short paths, not in the state folder: a unix socket path may not exceed 108 bytes (containerd's, the
# kubelet's under its root-dir), and a state folder (a test's tmp path, a deep checkout) can be long.
# SOCKETS/TAG: the relays' and containerd's sockets, the record of the host's sysctls (until reboot, like
# the sysctls themselves); NODE_ROOT/TAG/NAME: a node's containerd and kubelet data, configs and logs.
SOCKETS = Path("/run/layerlb-e2e")
NODE_ROOT = Path("/var/lib/llbk")


class NodeError(RuntimeError):
    """A node could not be created, started or removed."""


@dataclass(frozen=True)
class Node:
    """One node: its name, namespace, addresses and folders."""

    name: str
    index: int
    netns: str
    ip: str
    pod_cidr: str
    ip6: str
    pod_cidr6: str
    folder: Path
    cgroup: str  # the kubelet's cgroupRoot, relative to each hierarchy
    sockets: Path  # containerd's sockets (short paths, see SOCKETS)

    @property
    def containerd_socket(self) -> Path:
        return self.sockets / "containerd.sock"


def node_layout(tag: str, count: int) -> list[Node]:
    """The nodes a cluster tagged ``tag`` has: names node1..nodeN, 172.28.0.1N and fd00:28::1N, pods
    10.244.N.0/24 and fd00:244:N::/64."""
    return [
        Node(
            name=f"node{i}",
            index=i,
            netns=f"llbk-{tag}-node{i}",
            ip=f"172.28.0.{10 + i}",
            pod_cidr=f"10.244.{i}.0/24",
            ip6=f"fd00:28::{10 + i}",
            pod_cidr6=f"fd00:244:{i}::/64",
            folder=NODE_ROOT / tag / f"node{i}",
            cgroup=f"llbk-{tag}-node{i}",
            sockets=SOCKETS / tag / f"node{i}",
        )
        for i in range(1, count + 1)
    ]


def api_socket(tag: str) -> Path:
    """Where the host's relay to the API server listens, for the nodes' relays."""
    return SOCKETS / tag / "api.sock"


def egress_socket(tag: str) -> Path:
    """Where the egress proxy listens for the API server's CONNECTs into the nodes' network."""
    return SOCKETS / tag / "egress.sock"


def network_netns(tag: str) -> str:
    return f"llbk-{tag}-net"


def client_netns(tag: str) -> str:
    return f"llbk-{tag}-client"


# ------------------------------------------------------------------------------------------- shell


def run(argv: list[str], *, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def ip(*args: str, netns: str | None = None, check: bool = True) -> None:
    run(["ip", *(["-n", netns] if netns else []), *args], check=check)


def write_sysctl(netns: str, key: str, value: str) -> None:
    """A sysctl inside ``netns`` (per-namespace knobs only)."""
    write_sysctls(netns, {key: value})


def write_sysctls(netns: str, values: dict[str, str]) -> None:
    """Sysctls inside ``netns`` (per-namespace knobs only), in one `sysctl` run."""
    settings = [f"{key.replace('/', '.')}={value}" for key, value in values.items()]
    run(["nsenter", f"--net={NETNS_DIR / netns}", "sysctl", "-qw", *settings])


# The links of every namespace made here: interfaces created after these are set take them as defaults.
# IPv6 addresses (link-local ones too) skip duplicate address detection, so they are usable at once, and
# no router advertisement changes a route. No ICMP redirects, sent or taken: a node forwards a packet it
# has no rule for yet (a VIP's first SYN before kube-proxy's sync) back out of its one interface, and the
# redirect it would send makes the LAN client bypass it for that address for minutes.
QUIET_LINKS = {
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv6/conf/all/accept_ra": "0",
    "net/ipv6/conf/default/accept_ra": "0",
    "net/ipv6/conf/all/accept_redirects": "0",
    "net/ipv6/conf/default/accept_redirects": "0",
    "net/ipv4/conf/all/accept_redirects": "0",
    "net/ipv4/conf/default/accept_redirects": "0",
    "net/ipv4/conf/all/send_redirects": "0",
    "net/ipv4/conf/default/send_redirects": "0",
}


def spawn(argv: list[str], name: str, folder: Path, netns: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` (inside ``netns`` when given) in its own session, so it outlives us, logging to
    ``folder/name.log`` and recording its pid in ``folder/name.pid``."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = ["nsenter", f"--net={NETNS_DIR / netns}", "--"] if netns else []
    with (folder / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN.append(process)
    (folder / f"{name}.pid").write_text(f"{process.pid}\n")
    return process


def spawn_in(netns: str, name: str, argv: list[str], folder: Path) -> int:
    """`spawn` inside network namespace ``netns``; returns the pid."""
    return spawn(argv, name, folder, netns).pid


# Popen objects kept so they are reaped instead of lingering as zombies.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for child in _CHILDREN:
            child.poll()
        if time.monotonic() > deadline:
            tail = ""
            if log is not None:
                with contextlib.suppress(OSError):
                    tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise NodeError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------- network


def create_network(tag: str, nodes: list[Node], service_cidrs: list[str]) -> None:
    """The bridge namespace and one namespace per node on it, dual-stack, with routes between pod CIDRs;
    ``service_cidrs`` (one per family) are routed from the bridge namespace through the first node."""
    net = network_netns(tag)
    ip("netns", "add", net)
    write_sysctls(net, {**QUIET_LINKS, "net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1"})
    ip("link", "set", "lo", "up", netns=net)
    ip("link", "add", "br0", "type", "bridge", netns=net)
    ip("addr", "add", f"{NETWORK_IP}/24", "dev", "br0", netns=net)
    ip("addr", "add", f"{NETWORK_IP6}/64", "dev", "br0", "nodad", netns=net)
    ip("link", "set", "br0", "up", netns=net)
    client = client_netns(tag)
    ip("netns", "add", client)
    write_sysctls(client, QUIET_LINKS)
    ip("link", "set", "lo", "up", netns=client)
    ip("link", "add", "eth0", "type", "veth", "peer", "name", "client", "netns", net, netns=client)
    ip("link", "set", "client", "master", "br0", "up", netns=net)
    ip("addr", "add", f"{CLIENT_IP}/24", "dev", "eth0", netns=client)
    ip("addr", "add", f"{CLIENT_IP6}/64", "dev", "eth0", "nodad", netns=client)
    ip("link", "set", "eth0", "up", netns=client)
    for node in nodes:
        ip("netns", "add", node.netns)
        write_sysctls(
            node.netns,
            {
                **QUIET_LINKS,
                "net/ipv4/ip_forward": "1",
                "net/ipv6/conf/all/forwarding": "1",
                # Replies between pods of one node's bridge must pass netfilter, or a Service's DNAT is not
                # undone.
                "net/bridge/bridge-nf-call-iptables": "1",
                "net/bridge/bridge-nf-call-ip6tables": "1",
            },
        )
        ip("link", "set", "lo", "up", netns=node.netns)
        # The veth is created inside the node's namespace, so no interface ever appears on the host.
        ip("link", "add", "eth0", "type", "veth", "peer", "name", node.name, "netns", net, netns=node.netns)
        ip("link", "set", node.name, "master", "br0", "up", netns=net)
        ip("addr", "add", f"{node.ip}/24", "dev", "eth0", netns=node.netns)
        ip("addr", "add", f"{node.ip6}/64", "dev", "eth0", "nodad", netns=node.netns)
        ip("link", "set", "eth0", "up", netns=node.netns)
        ip("route", "add", "default", "via", NETWORK_IP, netns=node.netns)
        ip("-6", "route", "add", "default", "via", NETWORK_IP6, netns=node.netns)
        # The bridge namespace reaches every pod (the API server's CONNECTs to pods and webhooks).
        ip("route", "add", node.pod_cidr, "via", node.ip, netns=net)
        ip("-6", "route", "add", node.pod_cidr6, "via", node.ip6, netns=net)
        for other in nodes:
            if other is not node:
                ip("route", "add", other.pod_cidr, "via", other.ip, netns=node.netns)
                ip("-6", "route", "add", other.pod_cidr6, "via", other.ip6, netns=node.netns)
    # Service addresses from the bridge namespace: through the first node's kube-proxy.
    for cidr in service_cidrs:
        gateway = nodes[0].ip6 if ":" in cidr else nodes[0].ip
        ip(*(["-6"] if ":" in cidr else []), "route", "add", cidr, "via", gateway, netns=net)


# ----------------------------------------------------------------------------------------- configs


def _cgroup_hierarchies(unified: bool = False) -> list[Path]:
    """Every mounted cgroup v1 hierarchy (cpu, memory, pids, ..., name=systemd); with `unified`, also the
    cgroup2 mount of a hybrid setup, where runc mirrors the pods' cgroups (to be removed, not created)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and (parts[2] == "cgroup" or (unified and parts[2] == "cgroup2")):
            found.append(Path(parts[1]))
    if not found:
        raise NodeError("no cgroup v1 hierarchy is mounted (these nodes need cgroupfs with cgroup v1)")
    return found


def create_cgroups(node: Node) -> None:
    """The kubelet's cgroupRoot, created in every hierarchy (the kubelet expects it to exist)."""
    for hierarchy in _cgroup_hierarchies():
        path = hierarchy / node.cgroup
        path.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            # A new cpuset starts empty and takes no task until it has CPUs and memory nodes.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (path / knob).write_text((hierarchy / knob).read_text())
        if (hierarchy / "cpu.shares").exists():
            # A node's pods weigh as a machine's would against the host's own busy processes (the control
            # plane, test runners, each weighing 1024 from the root cgroup): without this, one busy test
            # process starves a node's pods until their readiness probes time out.
            (path / "cpu.shares").write_text(str(NODE_CPU_SHARES))


def containerd_config(node: Node) -> str:
    base = node.folder / "containerd"
    return f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{node.containerd_socket}"

[ttrpc]
  address = "{node.sockets / "containerd.ttrpc"}"

[debug]
  level = "warn"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{base / "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{node.folder / "cni"}"
    max_conf_num = 1
"""


def cni_config(node: Node, tag: str) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": f"llbk-{tag}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    # No masquerade: pods on other nodes see a pod's own address, as on a routed cluster.
                    "ipMasq": False,
                    "hairpinMode": True,
                    # A pod's addresses: IPv4 first (its status.podIP), then IPv6; the bridge plugin turns
                    # duplicate address detection off in the pod (`enabledad` false), so both work at once.
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": node.pod_cidr}], [{"subnet": node.pod_cidr6}]],
                        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                        "dataDir": str(node.folder / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


def kubelet_config(node: Node, ca: Path) -> str:
    root = node.folder / "kubelet"
    return f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node.ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
cgroupRoot: /{node.cgroup}
cgroupsPerQOS: true
failSwapOn: false
failCgroupV1: false
oomScoreAdj: 0
containerRuntimeEndpoint: unix://{node.containerd_socket}
podLogsDir: {root / "pod-logs"}
volumePluginDir: {root / "volume-plugins"}
resolvConf: {node.folder / "resolv.conf"}
registerNode: true
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 20s
maxPods: 60
protectKernelDefaults: false
localStorageCapacityIsolation: false
"""


def kube_proxy_config(node: Node, kubeconfig: Path, cluster_cidr: str) -> str:
    return f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig}}}
mode: nftables
hostnameOverride: {node.name}
clusterCIDR: {cluster_cidr}
oomScoreAdj: 0
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
nftables: {{syncPeriod: 30s, minSyncPeriod: 0s}}
"""


# ----------------------------------------------------------------------------------------- start


@dataclass(frozen=True)
class Binaries:
    kubelet: Path
    kube_proxy: Path


def start_network_services(tag: str, state_dir: Path, api_port: int) -> dict[str, int]:
    """The host-side relay to the API server (a unix socket the nodes' relays connect to) and the egress
    proxy inside the bridge namespace. Returns their pids."""
    folder = state_dir / "network"
    folder.mkdir(parents=True, exist_ok=True)
    api_sock = api_socket(tag)
    api_sock.parent.mkdir(parents=True, exist_ok=True)
    pids: dict[str, int] = {}
    with (folder / "api-relay.log").open("ab") as log:
        process = subprocess.Popen(
            ["socat", f"UNIX-LISTEN:{api_sock},fork,unlink-early,mode=600", f"TCP:127.0.0.1:{api_port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _CHILDREN.append(process)
    pids["api-relay"] = process.pid
    egress_sock = egress_socket(tag)
    pids["egress"] = spawn_in(
        network_netns(tag),
        "egress",
        [sys.executable, str(Path(__file__).with_name("egress.py")), str(egress_sock)],
        folder,
    )
    wait_for("the API relay socket", api_sock.exists, 30, folder / "api-relay.log")
    wait_for("the egress proxy socket", egress_sock.exists, 30, folder / "egress.log")
    return pids


def start_node(node: Node, tag: str) -> dict[str, int]:
    """The API relay and containerd of one node; returns their pids. The caller imports images (at least
    the pause image) before the kubelet starts: see `import_images`, `start_kubelet`, `start_kube_proxy`."""
    folder = node.folder
    (folder / "cni").mkdir(parents=True, exist_ok=True)
    (folder / "cni" / "10-bridge.conflist").write_text(cni_config(node, tag))
    (folder / "containerd").mkdir(parents=True, exist_ok=True)
    (folder / "containerd" / "config.toml").write_text(containerd_config(node))
    (folder / "resolv.conf").write_text("nameserver 127.0.0.1\noptions ndots:1\n")
    create_cgroups(node)
    pids: dict[str, int] = {}
    pids["relay"] = spawn_in(
        node.netns,
        "relay",
        ["socat", f"TCP-LISTEN:{API_RELAY_PORT},fork,reuseaddr", f"UNIX-CONNECT:{api_socket(tag)}"],
        folder,
    )
    node.sockets.mkdir(parents=True, exist_ok=True)
    pids["containerd"] = spawn_in(
        node.netns,
        "containerd",
        ["containerd", "--config", str(folder / "containerd" / "config.toml")],
        folder,
    )
    containerd = pids["containerd"]

    def listening() -> bool:
        if not _alive(containerd):
            raise NodeError(f"{node.name}'s containerd exited:\n{_tail(folder / 'containerd.log')}")
        return node.containerd_socket.exists()

    wait_for(f"{node.name}'s containerd socket", listening, 60, folder / "containerd.log")
    return pids


def start_kubelet(node: Node, binaries: Binaries, ca: Path) -> dict[str, int]:
    folder = node.folder
    (folder / "kubelet").mkdir(parents=True, exist_ok=True)
    (folder / "kubelet" / "config.yaml").write_text(kubelet_config(node, ca))
    pids = {
        "kubelet": spawn_in(
            node.netns,
            "kubelet",
            [
                str(binaries.kubelet),
                f"--config={folder / 'kubelet' / 'config.yaml'}",
                f"--kubeconfig={folder / 'kubelet.kubeconfig'}",
                f"--root-dir={folder / 'kubelet' / 'root'}",
                f"--cert-dir={folder / 'kubelet' / 'pki'}",
                f"--hostname-override={node.name}",
                f"--node-ip={node.ip},{node.ip6}",  # dual-stack, IPv4 first
                f"--node-labels=layerlb.dev/e2e-node={node.name}",
                "--v=1",
            ],
            folder,
        )
    }
    return pids


def start_kube_proxy(node: Node, binaries: Binaries, cluster_cidr: str) -> dict[str, int]:
    """kube-proxy for both families (its primary IPv4, from bindAddress); ``cluster_cidr`` names the pod
    CIDR of each ("10.244.0.0/16,fd00:244::/48")."""
    folder = node.folder
    (folder / "kube-proxy.yaml").write_text(
        kube_proxy_config(node, folder / "kube-proxy.kubeconfig", cluster_cidr)
    )
    return {
        "kube-proxy": spawn_in(
            node.netns,
            "kube-proxy",
            [str(binaries.kube_proxy), f"--config={folder / 'kube-proxy.yaml'}", "--v=1"],
            folder,
        )
    }


def tag_image(node: Node, source: str, target: str) -> None:
    """Give an imported image a second name in the node's containerd, as `docker tag` does (e.g. the name a
    chart's default values pull, so the README's install works without a registry)."""
    sock = str(node.containerd_socket)
    run(["ctr", "-a", sock, "-n", "k8s.io", "images", "rm", target], check=False)
    run(["ctr", "-a", sock, "-n", "k8s.io", "images", "tag", source, target])


def import_images(node: Node, archives: Iterable[Path]) -> None:
    """Load docker-archive tarballs into the node's containerd (the ``k8s.io`` namespace the CRI uses)."""
    for archive in archives:
        done = run(
            [
                "ctr",
                "-a",
                str(node.containerd_socket),
                "-n",
                "k8s.io",
                "images",
                "import",
                "--no-unpack",
                str(archive),
            ],
            check=False,
            timeout=300,
        )
        if done.returncode != 0:
            raise NodeError(f"{node.name}: importing image {archive} failed: {done.stderr.strip()}")


# ----------------------------------------------------------------------------------------- remove


def _pids_in_cgroup(node: Node) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _cgroup_hierarchies(unified=True):
        root = hierarchy / node.cgroup
        if not root.exists():
            continue
        for dirpath, _dirs, files in os.walk(root):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split())
    return pids


def _netns_inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_with_arg(fragment: str) -> set[int]:
    """Processes whose command line mentions ``fragment`` (a path of this cluster's state folder)."""
    found: set[int] = set()
    needle = fragment.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
    return found - _ancestors()


def _ancestors() -> set[int]:
    """This process and its parents: their command lines may name the state folder (`--state-dir`)."""
    chain: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return chain


def _pids_in_netns(netns: str) -> set[int]:
    inode = _netns_inode(NETNS_DIR / netns)
    if inode is None:
        return set()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _netns_inode(entry / "ns" / "net") == inode:
            found.add(int(entry.name))
    return found


def _kill(pids: set[int], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL what is left; waits until they are gone (zombies of ours reaped)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline:
            for child in _CHILDREN:
                child.poll()
            alive = {p for p in pids if _alive(p)}
            if not alive:
                return
            time.sleep(0.1)
        pids = {p for p in pids if _alive(p)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _mounts_under(prefix: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == str(prefix) or point.startswith(f"{prefix}/"):
            points.append(point)
    return points


def remove_nodes(tag: str, state_dir: Path, nodes: list[Node]) -> list[str]:
    """Stop and remove every node of the cluster; returns what could not be undone (empty when clean)."""
    problems: list[str] = []
    # The kubelets first, so they do not restart the containers being killed.
    for node in nodes:
        _kill({p for name in ("kubelet", "kube-proxy") if (p := _read_pid(node.folder / f"{name}.pid"))})
    # Containers: every task in the node's cgroups. Their network namespaces are noted first, so the
    # `cni-*` entries containerd made for them can be found once they are gone.
    pod_netns_inodes: set[int] = set()
    for node in nodes:
        pids = _pids_in_cgroup(node)
        for pid in pids:
            if (inode := _netns_inode(Path(f"/proc/{pid}/ns/net"))) is not None:
                pod_netns_inodes.add(inode)
        _kill(pids, timeout=5.0)
    # containerd, its shims (their command line names the node's socket) and the relays.
    for node in nodes:
        _kill(
            _pids_with_arg(str(node.folder)) | _pids_with_arg(str(node.sockets)) | _pids_in_netns(node.netns)
        )
    _kill(_pids_with_arg(str(api_socket(tag))) | _pids_with_arg(str(egress_socket(tag))))
    _kill(_pids_in_netns(network_netns(tag)) | _pids_in_netns(client_netns(tag)))
    if NETNS_DIR.exists():
        for entry in NETNS_DIR.iterdir():
            if entry.name.startswith("cni-") and _netns_inode(entry) in pod_netns_inodes:
                run(["umount", "-l", str(entry)], check=False)
                with contextlib.suppress(OSError):
                    entry.unlink()
    for point in sorted(_mounts_under(state_dir) + _mounts_under(NODE_ROOT / tag), key=len, reverse=True):
        done = run(["umount", "-l", point], check=False)
        if done.returncode != 0:
            problems.append(f"umount {point}: {done.stderr.strip()}")
    for node in nodes:
        for hierarchy in _cgroup_hierarchies(unified=True):
            root = hierarchy / node.cgroup
            if root.exists():
                for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: len(w[0]), reverse=True):
                    try:
                        Path(dirpath).rmdir()
                    except OSError as error:
                        problems.append(f"cgroup {dirpath}: {error}")
        ip("netns", "del", node.netns, check=False)
    ip("netns", "del", client_netns(tag), check=False)
    ip("netns", "del", network_netns(tag), check=False)
    if CONTAINER_LOGS.exists():
        for link in CONTAINER_LOGS.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(f"{NODE_ROOT / tag}/"):
                    link.unlink()
    if CNI_CACHE.exists():
        # libcni's result cache: `NETWORK-SANDBOX-IFNAME`, for our network and containerd's loopback.
        sandboxes = {
            entry.name
            for node in nodes
            for entry in _listdir(
                node.folder / "containerd" / "root" / "io.containerd.grpc.v1.cri" / "sandboxes"
            )
        }
        for cached in CNI_CACHE.iterdir():
            if cached.name.startswith(f"llbk-{tag}-") or any(f"-{s}-" in cached.name for s in sandboxes):
                with contextlib.suppress(OSError):
                    cached.unlink()
    restore_sysctls(tag)
    for node in nodes:
        shutil.rmtree(node.folder, ignore_errors=True)
    shutil.rmtree(NODE_ROOT / tag, ignore_errors=True)
    with contextlib.suppress(OSError):
        NODE_ROOT.rmdir()  # when no other cluster's nodes are left
    for leftover in ("nodes", "network"):
        shutil.rmtree(state_dir / leftover, ignore_errors=True)
    shutil.rmtree(SOCKETS / tag, ignore_errors=True)
    return problems


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def record_sysctls(tag: str) -> None:
    """Note the host-global sysctls the kubelet will change (once: a restart must not record its own)."""
    path = SOCKETS / tag / "host-sysctls.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        values = {key: (Path("/proc/sys") / key).read_text().strip() for key in KUBELET_SYSCTLS}
        path.write_text(json.dumps(values))


def restore_sysctls(tag: str) -> None:
    path = SOCKETS / tag / "host-sysctls.json"
    with contextlib.suppress(OSError, ValueError):
        for key, value in json.loads(path.read_text()).items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / key).write_text(value)
        path.unlink()

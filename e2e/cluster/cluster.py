"""A local Kubernetes cluster: etcd, kube-apiserver and kube-controller-manager on loopback, and, when
asked for, kube-scheduler and real nodes (kubelet + containerd + kube-proxy in network namespaces,
``nodes.py``).

The binaries come from ``e2e/cluster/build.sh`` (built once from Go modules into ``.cache/k8s/bin``).
Without nodes, pods stay ``Pending`` (the e2e pod runner plays the node); everything else (CRDs, RBAC,
Deployments → ReplicaSets → Pods, garbage collection, service accounts) behaves as in a real cluster.

As a script::

    python e2e/cluster/cluster.py up [--state-dir DIR] [--nodes N]   # last line: export KUBECONFIG=...
    python e2e/cluster/cluster.py status [--state-dir DIR]
    python e2e/cluster/cluster.py down [--state-dir DIR]

As a module: ``up(state_dir) -> Cluster`` and ``down(state_dir)``. Both are idempotent. The processes
run in their own sessions, so they outlive the Python process that started them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Imported as `e2e.cluster.cluster` by the tests and run as a script (`python e2e/cluster/cluster.py`).
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from e2e.cluster import nodes as node_kit

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = Path(__file__).resolve().with_name("build.sh")

SERVICE_CIDR = "10.0.0.0/24"
# The cluster is dual-stack, IPv4 first (a Service that asks nothing stays IPv4 single-stack): a Service
# may ask for PreferDualStack/RequireDualStack and get an address of each family; with real nodes, pods and
# nodes have both families too and kube-proxy serves both (``nodes.py``).
SERVICE_CIDR_V6 = "fd00:10:96::/112"
SERVICE_FIRST_IP = "10.0.0.1"
# The host's loopback as a QEMU guest with user networking sees it: the IPVS e2e pods run in such a guest.
GUEST_HOST_IP = "10.0.2.2"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Components in start order; stopped in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")
BINARIES = COMPONENTS
# With nodes: the scheduler joins the control plane, and each node's processes (``nodes.py``).
NODE_BINARIES = ("kube-scheduler", "kubelet", "kube-proxy")
# Registry of clusters with nodes (their network namespaces, cgroups and mounts are host-wide): lets a
# later run remove what a killed run left behind (`remove_stale`).
REGISTRY = Path("/run/layerlb-e2e")

# Files and folders that `up` creates in the state folder; `down` removes only these.
_STATE_ENTRIES = (
    "pki",
    "etcd-data",
    "kcm-certs",
    "apiserver-certs",
    "flexvolume",
    "kubeconfig",
    "kcm.kubeconfig",
    "scheduler.kubeconfig",
    "egress-selector.yaml",
    "kube-scheduler.pid",
    "kube-scheduler.log",
    "cluster.json",
    *(f"{c}.pid" for c in COMPONENTS),
    *(f"{c}.log" for c in COMPONENTS),
)

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


class ClusterError(RuntimeError):
    """The control plane could not be built, started or reached."""


@dataclass(frozen=True)
class Cluster:
    """A running control plane. Paths are absolute."""

    state_dir: Path
    kubeconfig: Path
    server: str
    etcd_url: str
    bin_dir: Path
    pids: dict[str, int] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    # Real nodes (names node1..nodeN) and the tag naming their host-wide resources; none: pod runner only.
    nodes: tuple[str, ...] = ()
    tag: str = ""

    def node_list(self) -> list[node_kit.Node]:
        return node_kit.node_layout(self.tag, len(self.nodes))

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for subprocesses: KUBECONFIG set, the cache bin folder (helm) on PATH."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, default=str, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        data = json.loads(text)
        return cls(
            state_dir=Path(data["state_dir"]),
            kubeconfig=Path(data["kubeconfig"]),
            server=str(data["server"]),
            etcd_url=str(data["etcd_url"]),
            bin_dir=Path(data["bin_dir"]),
            pids={str(k): int(v) for k, v in data["pids"].items()},
            logs={str(k): Path(v) for k, v in data["logs"].items()},
            nodes=tuple(str(n) for n in data.get("nodes", ())),
            tag=str(data.get("tag", "")),
        )


# --------------------------------------------------------------------------------------- binaries


def cache_root() -> Path:
    """The git-ignored cache folder: ``$LAYERLB_CACHE`` or ``<repo>/.cache``."""
    env = os.environ.get("LAYERLB_CACHE")
    return Path(env).resolve() if env else REPO_ROOT / ".cache"


def default_bin_dir() -> Path:
    return cache_root() / "k8s" / "bin"


def default_state_dir() -> Path:
    return cache_root() / "cluster"


def binaries_present(bin_dir: Path | None = None, with_nodes: bool = False) -> bool:
    bdir = bin_dir or default_bin_dir()
    wanted = BINARIES + (NODE_BINARIES if with_nodes else ())
    return all(os.access(bdir / b, os.X_OK) for b in wanted)


def ensure_binaries(
    bin_dir: Path | None = None, progress: Progress = _stderr_progress, with_nodes: bool = True
) -> Path:
    """Run build.sh when a binary is missing (the first build takes many minutes)."""
    bdir = bin_dir or default_bin_dir()
    if binaries_present(bdir, with_nodes):
        return bdir
    if bin_dir is not None and bdir != default_bin_dir():
        raise ClusterError(f"control-plane binaries missing in {bdir}")
    progress(f"binaries missing in {bdir}; running {BUILD_SCRIPT} (first build: about 7-20 min)")
    # build.sh writes its [build] progress lines to stderr, which we pass through.
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0 or not binaries_present(bdir, with_nodes):
        raise ClusterError(f"{BUILD_SCRIPT} failed (exit {result.returncode})")
    return bdir


# ----------------------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _ec_key(pki: Path, name: str) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=pki
    )


def _signed_cert(pki: Path, name: str, subject: str, extensions: list[str]) -> None:
    """Key + certificate ``name`` signed by the CA in ``pki``."""
    _ec_key(pki, name)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    (pki / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "3650", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=pki,
    )  # fmt: skip


def _generate_pki(pki: Path, nodes: int = 0) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    # CA, with an explicit minimal config so the extensions are exactly these.
    (pki / "ca.cnf").write_text(
        "[req]\ndistinguished_name = dn\nx509_extensions = v3_ca\nprompt = no\n"
        "[dn]\nCN = layerlb-e2e-ca\n"
        "[v3_ca]\nbasicConstraints = critical,CA:TRUE\n"
        "keyUsage = critical,keyCertSign,cRLSign,digitalSignature\n"
        "subjectKeyIdentifier = hash\n"
    )
    _ec_key(pki, "ca")
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-config", "ca.cnf", "-days", "3650", "-sha256",
        "-out", "ca.crt",
        cwd=pki,
    )  # fmt: skip
    leaf = ["basicConstraints = critical,CA:FALSE", "keyUsage = critical,digitalSignature,keyEncipherment"]
    sans = ",".join(
        [
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
            "IP:127.0.0.1",
            f"IP:{SERVICE_FIRST_IP}",
            f"IP:{GUEST_HOST_IP}",
        ]
    )
    _signed_cert(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        [*leaf, "extendedKeyUsage = serverAuth", f"subjectAltName = {sans}"],
    )
    client = [*leaf, "extendedKeyUsage = clientAuth"]
    _signed_cert(pki, "admin", "/O=system:masters/CN=admin", client)
    _signed_cert(pki, "kcm", "/CN=system:kube-controller-manager", client)
    # The API server's front-proxy (request-header) client, which controllers' delegated authn expects.
    _signed_cert(pki, "front-proxy-client", "/CN=front-proxy-client", client)
    # The scheduler, and what nodes need: the API server's client certificate towards kubelets, each
    # kubelet's (group system:nodes, bound to the system:node role) and kube-proxy's (system:node-proxier).
    _signed_cert(pki, "scheduler", "/CN=system:kube-scheduler", client)
    if nodes:
        _signed_cert(pki, "kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", client)
        _signed_cert(pki, "kube-proxy", "/CN=system:kube-proxy", client)
        for i in range(1, nodes + 1):
            _signed_cert(pki, f"node{i}", f"/O=system:nodes/CN=system:node:node{i}", client)
    # Service-account token signing key pair (RSA: the most widely accepted for bound tokens).
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=pki)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for leftover in pki.glob("*.csr"):
        leftover.unlink()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _write_kubeconfig(path: Path, server: str, pki: Path, user: str, cert: str) -> None:
    text = f"""apiVersion: v1
kind: Config
clusters:
- name: layerlb-e2e
  cluster:
    server: {server}
    certificate-authority-data: {_b64(pki / "ca.crt")}
users:
- name: {user}
  user:
    client-certificate-data: {_b64(pki / f"{cert}.crt")}
    client-key-data: {_b64(pki / f"{cert}.key")}
contexts:
- name: layerlb-e2e
  context:
    cluster: layerlb-e2e
    user: {user}
    namespace: default
current-context: layerlb-e2e
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)


# -------------------------------------------------------------------------------------- processes


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open at once, so none repeats)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


# Popen objects of the processes this interpreter started: kept so they are not collected (which
# warns) and so a dead child can be reaped instead of lingering as a zombie.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(name: str, argv: list[str], state_dir: Path) -> int:
    proc = node_kit.spawn(argv, name, state_dir)
    _CHILDREN[proc.pid] = proc
    return proc.pid


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        proc.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _is_alive(pid: int, binary: str) -> bool:
    """True when ``pid`` runs ``binary`` (guards against reuse of the pid) and is not a zombie."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        # Our own child: right after Popen returns, the kernel may not have set the new
        # /proc/<pid>/cmdline yet, so trust the Popen object instead.
        return proc.poll() is None
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    argv0 = cmdline.split(b"\0", 1)[0].decode(errors="replace")
    return os.path.basename(argv0) == binary


def _read_pid(state_dir: Path, name: str) -> int | None:
    try:
        return int((state_dir / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _stop(pid: int, binary: str, timeout: float) -> None:
    if not _is_alive(pid, binary):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            try:
                os.killpg(pid, sig)  # the process leads its own session / group
            except ProcessLookupError:
                os.kill(pid, sig)
        if _wait_for(lambda: not _is_alive(pid, binary), timeout if sig == signal.SIGTERM else 10.0):
            break
    _CHILDREN.pop(pid, None)


def _wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------- HTTP


def _admin_ssl_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def _http_get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 when the server cannot be reached."""
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return 0, ""


def _api_ok(cluster: Cluster, path: str) -> bool:
    pki = cluster.state_dir / "pki"
    try:
        ctx = _admin_ssl_context(pki)
    except (OSError, ssl.SSLError):
        return False
    status, _ = _http_get(cluster.server + path, ctx)
    return status == 200


def _wait_ready(
    what: str, check: Callable[[], bool], cluster: Cluster, names: tuple[str, ...], timeout: float
) -> None:
    """Poll ``check`` until true; fail early (with the log's tail) if a process dies meanwhile."""
    dead: list[str] = []

    def step() -> bool:
        for name in names:
            if not _is_alive(cluster.pids[name], name):
                dead.append(name)
                return True
        return check()

    if not _wait_for(step, timeout, interval=0.25) or dead:
        name = dead[0] if dead else names[-1]
        reason = f"{name} exited" if dead else f"timed out after {timeout:.0f} s"
        raise ClusterError(f"{what}: {reason}; log {cluster.logs[name]}:\n{_log_tail(cluster.logs[name])}")


# ------------------------------------------------------------------------------------- up / down


def _load(state_dir: Path) -> Cluster | None:
    try:
        return Cluster.from_json((state_dir / "cluster.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _process_alive(pid: int, name: str) -> bool:
    """Control-plane processes are checked by binary name too; node processes start under `nsenter`
    (whose name they keep until it execs), so for them being alive is enough."""
    if name in COMPONENTS or name == "kube-scheduler":
        return _is_alive(pid, name)
    return node_kit._alive(pid)


def _healthy(cluster: Cluster) -> bool:
    if not set(COMPONENTS) <= set(cluster.pids):
        return False
    if not all(_process_alive(pid, name) for name, pid in cluster.pids.items()):
        return False
    return _api_ok(cluster, "/readyz")


def status(state_dir: Path | None = None) -> Cluster | None:
    """The running cluster recorded in ``state_dir``, or None when it is not (fully) up."""
    sdir = (state_dir or default_state_dir()).resolve()
    cluster = _load(sdir)
    return cluster if cluster is not None and _healthy(cluster) else None


def tag_of(state_dir: Path) -> str:
    """A short name for the host-wide resources of the cluster kept in ``state_dir``."""
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]


def up(
    state_dir: Path | None = None,
    *,
    bin_dir: Path | None = None,
    timeout: float = 300.0,
    build: bool = True,
    progress: Progress = _quiet,
    nodes: int = 0,
    images: Sequence[Path] = (),
    owner: int | None = None,
) -> Cluster:
    """Start the cluster with its state in ``state_dir``, or return the one already running there.

    Waits until the API server's /readyz passes and the controller manager has created the ``default``
    service account (so pods can be created at once). With ``nodes``, also starts the scheduler and that
    many nodes, imports ``images`` (docker-archive tarballs; the pause image among them) into each, and
    waits until every node is Ready. ``owner``: the pid whose death makes the cluster stale (a test
    session's); None for a cluster that lives until `down`. ``timeout`` bounds each wait.
    """
    sdir = (state_dir or default_state_dir()).resolve()
    running = status(sdir)
    if running is not None and len(running.nodes) == nodes:
        progress(f"already running: {running.server} (pids {running.pids})")
        return running
    if _load(sdir) is not None or any((sdir / f"{c}.pid").exists() for c in COMPONENTS):
        progress("stale, partial or differently sized cluster state found; cleaning it up")
        down(sdir)

    bdir = (
        ensure_binaries(bin_dir, progress, nodes > 0) if build else (bin_dir or default_bin_dir()).resolve()
    )
    if not binaries_present(bdir, nodes > 0):
        raise ClusterError(f"cluster binaries missing in {bdir}; run {BUILD_SCRIPT}")
    sdir.mkdir(parents=True, exist_ok=True)
    pki = sdir / "pki"
    progress(f"generating certificates in {pki}")
    _generate_pki(pki, nodes)
    tag = tag_of(sdir) if nodes else ""
    if nodes:
        _register(tag, sdir, nodes, owner)

    etcd_port, etcd_peer_port, api_port, kcm_port, scheduler_port = _free_ports(5)
    server = f"https://127.0.0.1:{api_port}"
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    kubeconfig = sdir / "kubeconfig"
    kcm_kubeconfig = sdir / "kcm.kubeconfig"
    _write_kubeconfig(kubeconfig, server, pki, "admin", "admin")
    _write_kubeconfig(kcm_kubeconfig, server, pki, "system:kube-controller-manager", "kcm")

    pids: dict[str, int] = {}
    logs = {c: sdir / f"{c}.log" for c in COMPONENTS}
    node_names = tuple(f"node{i}" for i in range(1, nodes + 1))
    cluster = Cluster(sdir, kubeconfig, server, etcd_url, bdir, pids, logs, node_names, tag)
    node_flags: list[str] = []
    if nodes:
        # The API server reaches kubelets (logs, exec) through a CONNECT proxy in the nodes' network.
        egress = sdir / "egress-selector.yaml"
        egress.write_text(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
            "- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n"
            f"    transport:\n      uds:\n        udsName: {node_kit.egress_socket(tag)}\n"
        )
        node_flags = [
            f"--egress-selector-config-file={egress}",
            f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    try:
        progress(f"starting etcd on {etcd_url}")
        peer = f"http://127.0.0.1:{etcd_peer_port}"
        pids["etcd"] = _spawn(
            "etcd",
            [
                str(bdir / "etcd"),
                "--name=layerlb-e2e",
                f"--data-dir={sdir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=layerlb-e2e={peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            sdir,
        )
        _write_state(cluster)
        _wait_ready(
            "etcd",
            lambda: '"health":"true"' in _http_get(f"{etcd_url}/health")[1],
            cluster,
            ("etcd",),
            timeout,
        )

        progress(f"starting kube-apiserver on {server}")
        pids["kube-apiserver"] = _spawn(
            "kube-apiserver",
            [
                str(bdir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--cert-dir={sdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--secure-port={api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # A loopback address is invalid in the `kubernetes` Endpoints; nothing in-cluster
                # reaches the API server through the service anyway (no kubelet, no kube-proxy).
                "--endpoint-reconciler-type=none",
                f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR_V6}",
                "--allow-privileged=true",
                "--authorization-mode=RBAC",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--requestheader-client-ca-file={pki / 'ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                "--profiling=false",
                *node_flags,
            ],
            sdir,
        )
        _write_state(cluster)
        _wait_ready(
            "kube-apiserver /readyz",
            lambda: _api_ok(cluster, "/readyz"),
            cluster,
            ("etcd", "kube-apiserver"),
            timeout,
        )

        progress("starting kube-controller-manager")
        pids["kube-controller-manager"] = _spawn(
            "kube-controller-manager",
            [
                str(bdir / "kube-controller-manager"),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={sdir / 'kcm-certs'}",
                "--leader-elect=false",
                "--controllers=*",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                # As the API server's (node CIDRs are not allocated: each node's CNI config names its own).
                f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR_V6}",
                f"--flex-volume-plugin-dir={sdir / 'flexvolume'}",  # else it creates /usr/libexec/...
            ],
            sdir,
        )
        _write_state(cluster)
        _wait_ready(
            "kube-controller-manager (default service account)",
            lambda: _api_ok(cluster, "/api/v1/namespaces/default/serviceaccounts/default"),
            cluster,
            COMPONENTS,
            timeout,
        )
        if nodes:
            _start_nodes(cluster, api_port, scheduler_port, images, timeout, progress)
    except BaseException:
        down(sdir)
        raise
    progress(f"ready: {server} (kubeconfig {kubeconfig})")
    return cluster


def _start_nodes(
    cluster: Cluster,
    api_port: int,
    scheduler_port: int,
    images: Sequence[Path],
    timeout: float,
    progress: Progress,
) -> None:
    """kube-scheduler, the nodes' network, each node's processes and images; returns once all are Ready."""
    sdir, pki, bdir, pids = cluster.state_dir, cluster.state_dir / "pki", cluster.bin_dir, cluster.pids
    started = time.monotonic()
    scheduler_kubeconfig = sdir / "scheduler.kubeconfig"
    _write_kubeconfig(scheduler_kubeconfig, cluster.server, pki, "system:kube-scheduler", "scheduler")
    pids["kube-scheduler"] = _spawn(
        "kube-scheduler",
        [
            str(bdir / "kube-scheduler"),
            f"--kubeconfig={scheduler_kubeconfig}",
            f"--authentication-kubeconfig={scheduler_kubeconfig}",
            f"--authorization-kubeconfig={scheduler_kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={scheduler_port}",
            "--leader-elect=false",
        ],
        sdir,
    )
    cluster.logs["kube-scheduler"] = sdir / "kube-scheduler.log"
    # Without the Node authorizer, kubelets get their rights from the system:node role by group.
    _kubectl(cluster, "apply", "-f", "-", stdin=_NODE_RBAC + _api_endpoint_slice(cluster))
    node_list = cluster.node_list()
    progress(f"creating the network of {len(node_list)} nodes ({node_kit.NODE_SUBNET})")
    node_kit.create_network(cluster.tag, node_list, [SERVICE_CIDR, SERVICE_CIDR_V6])
    node_kit.record_sysctls(cluster.tag)
    pids.update(node_kit.start_network_services(cluster.tag, sdir, api_port))
    _write_state(cluster)
    binaries = node_kit.Binaries(kubelet=bdir / "kubelet", kube_proxy=bdir / "kube-proxy")
    local_server = f"https://127.0.0.1:{node_kit.API_RELAY_PORT}"
    for node in node_list:
        node.folder.mkdir(parents=True, exist_ok=True)
        _write_kubeconfig(
            node.folder / "kubelet.kubeconfig", local_server, pki, f"system:node:{node.name}", node.name
        )
        _write_kubeconfig(
            node.folder / "kube-proxy.kubeconfig", local_server, pki, "system:kube-proxy", "kube-proxy"
        )
        for name, pid in node_kit.start_node(node, cluster.tag).items():
            pids[f"{node.name}/{name}"] = pid
        _write_state(cluster)
    for node in node_list:
        t = time.monotonic()
        node_kit.import_images(node, images)
        progress(f"{node.name}: {len(images)} images imported in {time.monotonic() - t:.1f} s")
        for name, pid in node_kit.start_kubelet(node, binaries, pki / "ca.crt").items():
            pids[f"{node.name}/{name}"] = pid
        cluster_cidr = f"{node_kit.POD_CIDR},{node_kit.POD_CIDR6}"
        for name, pid in node_kit.start_kube_proxy(node, binaries, cluster_cidr).items():
            pids[f"{node.name}/{name}"] = pid
        _write_state(cluster)
    names = set(cluster.nodes)

    def all_ready() -> bool:
        for key, pid in pids.items():
            if not _process_alive(pid, key):
                raise ClusterError(f"{key} exited; log:\n{_log_tail(_process_log(cluster, key))}")
        status, body = _http_get(f"{cluster.server}/api/v1/nodes", _admin_ssl_context(pki))
        if status != 200:
            return False
        ready = {
            item["metadata"]["name"]
            for item in json.loads(body)["items"]
            if any(
                c["type"] == "Ready" and c["status"] == "True" for c in item["status"].get("conditions", [])
            )
        }
        return names <= ready

    if not _wait_for(all_ready, timeout, interval=0.2):
        raise ClusterError(
            f"nodes not Ready after {timeout:.0f} s; kubelet log of node1:\n"
            + _log_tail(node_list[0].folder / "kubelet.log")
        )
    progress(f"{len(node_list)} nodes Ready {time.monotonic() - started:.1f} s after the scheduler started")


def _process_log(cluster: Cluster, key: str) -> Path:
    if "/" in key:
        node, name = key.split("/", 1)
        [found] = [n.folder for n in cluster.node_list() if n.name == node]
        return found / f"{name}.log"
    if key in ("api-relay", "egress"):
        return cluster.state_dir / "network" / f"{key}.log"
    return cluster.state_dir / f"{key}.log"


_NODE_RBAC = """apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: layerlb-e2e-nodes}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:node"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}]
---
"""


def _api_endpoint_slice(cluster: Cluster) -> str:
    """The `kubernetes` Service's endpoints: every node's relay to the API server (the API server runs
    with --endpoint-reconciler-type=none, its own address being loopback)."""
    endpoints = "".join(
        f"- addresses: [{node.ip}]\n  conditions: {{ready: true}}\n" for node in cluster.node_list()
    )
    return (
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        "metadata:\n  name: kubernetes\n  namespace: default\n"
        "  labels: {kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: e2e.layerlb.dev}\n"
        f"addressType: IPv4\nports: [{{name: https, port: {node_kit.API_RELAY_PORT}, protocol: TCP}}]\n"
        f"endpoints:\n{endpoints}"
    )


def _kubectl(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["kubectl", *args], input=stdin, env=cluster.env(), capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _register(tag: str, state_dir: Path, nodes: int, owner: int | None) -> None:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    entry = {"state_dir": str(state_dir), "nodes": nodes, "owner": owner}
    (REGISTRY / f"{tag}.json").write_text(json.dumps(entry))


def remove_stale(progress: Progress = _quiet) -> list[str]:
    """Tear down clusters with nodes whose owner (a test session) is gone: a killed run leaves its
    processes, namespaces, cgroups and mounts behind. Returns the state folders cleaned."""
    cleaned: list[str] = []
    if not REGISTRY.exists():
        return cleaned
    for entry in REGISTRY.glob("*.json"):
        try:
            data = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        owner = data.get("owner")
        if owner is None or node_kit._alive(int(owner)):
            continue
        state_dir = Path(data["state_dir"])
        progress(f"removing the cluster a dead session ({owner}) left in {state_dir}")
        _teardown(entry.stem, state_dir, int(data["nodes"]))
        cleaned.append(str(state_dir))
    return cleaned


def _teardown(tag: str, state_dir: Path, nodes: int) -> list[str]:
    problems = node_kit.remove_nodes(tag, state_dir, node_kit.node_layout(tag, nodes))
    # Control-plane processes whose pid files may be gone: every argv names the state folder.
    node_kit._kill(node_kit._pids_with_arg(str(state_dir)))
    with contextlib.suppress(OSError):
        (REGISTRY / f"{tag}.json").unlink()
    with contextlib.suppress(OSError):
        REGISTRY.rmdir()  # when no other cluster is registered
    return problems


def _write_state(cluster: Cluster) -> None:
    path = cluster.state_dir / "cluster.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cluster.to_json())
    tmp.replace(path)


def down(state_dir: Path | None = None, *, timeout: float = 20.0, progress: Progress = _quiet) -> None:
    """Stop the processes recorded in ``state_dir`` (SIGTERM, then SIGKILL) and remove its state.

    Only the files ``up`` creates are removed; the folder itself goes when it is left empty.
    """
    sdir = (state_dir or default_state_dir()).resolve()
    recorded = _load(sdir)
    problems: list[str] = []
    if recorded is not None and recorded.nodes:
        progress(f"removing {len(recorded.nodes)} nodes")
        problems = _teardown(recorded.tag, sdir, len(recorded.nodes))
    for name in ("kube-scheduler", *reversed(COMPONENTS)):
        pid = _read_pid(sdir, name)
        if pid is not None and _is_alive(pid, name):
            progress(f"stopping {name} (pid {pid})")
            _stop(pid, name, timeout)
            if _is_alive(pid, name):
                raise ClusterError(f"{name} (pid {pid}) did not stop")
    for entry in _STATE_ENTRIES:
        _remove(sdir / entry)
    with contextlib.suppress(OSError):
        sdir.rmdir()
    if problems:
        raise ClusterError("teardown left: " + "; ".join(problems))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in _walk_bottom_up(path):
            if child.is_dir() and not child.is_symlink():
                child.rmdir()
            else:
                child.unlink()
        path.rmdir()
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _walk_bottom_up(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        base = Path(dirpath)
        for f in filenames:
            yield base / f
        for d in dirnames:
            yield base / d


# ------------------------------------------------------------------------------------ outages


def crash(cluster: Cluster, names: Sequence[str]) -> dict[str, list[str]]:
    """SIGKILL the control-plane processes `names` (e.g. etcd and kube-apiserver), as a crashed control-plane
    host would lose them; returns each one's command line, for `restart`. Their state (etcd's data folder,
    the certificates) stays where `up` put it."""
    argvs: dict[str, list[str]] = {}
    for name in names:
        pid = cluster.pids[name]
        argvs[name] = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_for(functools.partial(_is_dead, pid, name), 10.0):
            raise ClusterError(f"{name} (pid {pid}) survived SIGKILL")
        _CHILDREN.pop(pid, None)
    return argvs


def _is_dead(pid: int, binary: str) -> bool:
    return not _is_alive(pid, binary)


def restart(cluster: Cluster, argvs: dict[str, list[str]], timeout: float = 120.0) -> None:
    """Start the processes `crash` killed again, in start order, from the same command lines and state;
    returns once the API server's /readyz passes. The new pids are recorded, so `down` stops them."""
    for name in (c for c in COMPONENTS if c in argvs):
        cluster.pids[name] = _spawn(name, argvs[name], cluster.state_dir)
        _write_state(cluster)
    _wait_ready("kube-apiserver /readyz after a restart", lambda: _api_ok(cluster, "/readyz"), cluster,
                tuple(c for c in COMPONENTS if c in argvs), timeout)  # fmt: skip


# -------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cluster.py",
        description="Local Kubernetes control plane (etcd, kube-apiserver, controller-manager).",
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument(
        "--state-dir", type=Path, default=None, help=f"state folder (default {default_state_dir()})"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each component")
    parser.add_argument(
        "--nodes", type=int, default=0, help="real nodes (kubelet, containerd, kube-proxy) to start"
    )
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="docker-archive tarball to import into every node",
    )
    args = parser.parse_args(argv)
    state_dir: Path = (args.state_dir or default_state_dir()).resolve()

    try:
        if args.command == "up":
            cluster = up(
                state_dir,
                timeout=args.timeout,
                progress=_stderr_progress,
                nodes=args.nodes,
                images=args.image,
            )
            print(f"# server {cluster.server}; pids {cluster.pids}; logs in {state_dir}", file=sys.stderr)
            sys.stderr.flush()
            print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
            return 0
        if args.command == "down":
            down(state_dir, progress=_stderr_progress)
            _stderr_progress(f"stopped; state removed from {state_dir}")
            return 0
        running = status(state_dir)
        if running is None:
            print(f"not running (state folder {state_dir})")
            return 1
        print(f"running: {running.server}")
        for name, pid in running.pids.items():
            print(f"  {name}: pid {pid}, log {running.logs[name]}")
        print(f"export KUBECONFIG={running.kubeconfig}")
        return 0
    except ClusterError as err:
        print(f"[cluster] ERROR: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

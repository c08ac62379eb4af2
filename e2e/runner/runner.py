"""The pod runner: kubelet, CNI and kube-proxy for layerlb's forwarding pods, where no kubelet runs.

It watches the forwarding pods (label `app.kubernetes.io/name=layerlb`, component `dataplane`) of the
namespaces it is given and, for each Pending one, does what the node would:

- **Placement (CNI).** A host-network pod gets a node namespace of its own (nodes are kept and reused
  after the pod goes, so that kernel state a pod leaves behind stays visible); with `max_nodes`, host
  pods share at most that many nodes, placed as the scheduler's host-port check would (never two pods
  with the same container port on one node; none fits: the pod stays Pending); any other pod gets its
  own pod namespace. The LoadBalancer's VIP (from its `status.vip`) is put on a non-host pod's loopback
  before it starts, and routed at the lab's router to every pod that passes its readiness probe.
- **The container (kubelet).** Exactly the pod's command, args and env (fieldRefs resolved), as the
  pod's user with only the capabilities it keeps, in a private mount namespace holding a real
  ServiceAccount token from the TokenRequest API (bound to the pod), `ca.crt` from the namespace's
  `kube-root-ca.crt` ConfigMap, and `namespace`, at the path in-cluster clients read. The API server is
  reached at the `kubernetes` Service address through the runner's relay (kube-proxy's part).
- **Status.** phase Running, podIP, hostIP, containerStatuses and the Ready condition following the
  readiness probe (probed every 0.1 s until it first passes, then every `periodSeconds`), so that the
  ReplicaSet's and Deployment's ready counts follow. A container that exits is restarted (back-off),
  one that fails its liveness probe is killed and restarted.
- **Deletion.** The processes of deleted pods get SIGTERM, then SIGKILL after the grace period; their
  namespaces go (a node's VIP routes too).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kubernetes import client as k8s
from kubernetes import config as k8s_config_module
from kubernetes import watch as k8s_watch_module

from e2e.runner import network, pods
from e2e.runner.network import Host, Lab
from e2e.runner.relay import Relay

log = logging.getLogger("layerlb.runner")

k8s_config: Any = k8s_config_module  # the client's config loaders and watch are untyped
k8s_watch: Any = k8s_watch_module
SELECTOR: Final = "app.kubernetes.io/name=layerlb,app.kubernetes.io/component=dataplane"
LB_LABEL: Final = "layerlb.dev/loadbalancer"
API_HOST: Final = "10.0.0.1"
API_PORT: Final = 443
KERNEL_ARCHITECTURES: Final = ("nat", "dsr", "tunnel")
TOKEN_SECONDS: Final = 3600
FAST_PROBE: Final = 0.1
MAX_GRACE: Final = 30.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(eq=False)
class Running:
    """One pod the runner has started."""

    uid: str
    namespace: str
    name: str
    lb: str
    launch: pods.Launch
    host: Host
    node: bool
    token_dir: Path | None
    log_path: Path
    vip_on_host: str | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    ready: bool = False
    ever_ready: bool = False
    ready_since: str = ""
    restarts: int = 0
    restart_at: float = 0.0
    next_readiness: float = 0.0
    next_liveness: float = 0.0
    liveness_failures: int = 0
    probing: concurrent.futures.Future[bool] | None = None
    probing_liveness: concurrent.futures.Future[bool] | None = None
    token_refresh: float = 0.0
    reported: str = ""  # the last status patched, to patch only changes
    spawned: float = 0.0  # monotonic time of the last start, for the log's timings
    stopping: bool = False


@dataclass
class _Cache:
    """Objects of one kind as the watch last saw them, by uid (pods) or namespace/name (LoadBalancers)."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return dict(self.items)


class PodRunner:
    """Runs the forwarding pods of `namespaces` until `close()`.

    `kubeconfig`: an admin kubeconfig (the runner plays the kubelet and the network, not a pod);
    `workdir`: tokens and container logs; `lab`: the network (a new one by default, closed with the runner).
    """

    def __init__(
        self,
        kubeconfig: Path,
        namespaces: list[str],
        workdir: Path,
        lab: Lab | None = None,
        max_nodes: int | None = None,
    ) -> None:
        self.max_nodes = max_nodes
        self.namespaces = namespaces
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        (workdir / "pods").mkdir(parents=True, exist_ok=True)
        Path(pods.SERVICE_ACCOUNT_DIR).mkdir(parents=True, exist_ok=True)  # the mount point, empty
        for index in range(4):
            Path(pods.STASH, str(index)).mkdir(parents=True, exist_ok=True)  # empty mount points too
        self.api = self._client()
        server = self.api.configuration.host.removeprefix("https://")
        host, _, port = server.rpartition(":")
        self.own_lab = lab is None
        self.lab = lab or Lab()
        self.relay = Relay(self.lab.router.name or "", (API_HOST, API_PORT), (host, int(port)))
        self.pods = _Cache()
        self.loadbalancers = _Cache()
        self.running: dict[str, Running] = {}
        self.refused: dict[str, str] = {}  # uid -> why the pod cannot run
        self.started = 0  # pods started so far: unique pod namespace names
        self.seen: dict[str, float] = {}  # uid -> when the runner first saw the pod (monotonic)
        self.nodes: dict[str, dict[str, set[int]]] = {}  # node namespace name -> {pod uid: its host ports}
        self.node_hosts: dict[str, Host] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        router = self.lab.router.name or ""
        self.probes = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="probe", initializer=network.enter, initargs=(router,)
        )
        self.stoppers = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="stop")
        self.stopping: set[concurrent.futures.Future[None]] = set()
        self.threads = [
            threading.Thread(target=self._watch_pods, args=(ns,), name=f"watch-pods-{ns}", daemon=True)
            for ns in namespaces
        ] + [
            threading.Thread(target=self._watch_lbs, args=(ns,), name=f"watch-lbs-{ns}", daemon=True)
            for ns in namespaces
        ]
        self.loop = threading.Thread(target=self._loop, name="runner", daemon=True)
        for thread in [*self.threads, self.loop]:
            thread.start()

    def _client(self) -> Any:
        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))

    # ------------------------------------------------------------------------------------ watching

    def _watch(self, cache: _Cache, key: Callable[[dict[str, Any]], str], lister: Callable[..., Any]) -> None:
        """List, then watch from the list's resourceVersion; start over on any error or expiry."""
        while not self._stop.is_set():
            try:
                listed = json.loads(lister(_preload_content=False).data)
                with cache.lock:
                    cache.items = {key(item): item for item in listed.get("items") or []}
                self._wake.set()
                stream = k8s_watch.Watch().stream(
                    lister, resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=30
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    item = event["raw_object"]
                    if event["type"] == "ERROR":
                        break
                    with cache.lock:
                        if event["type"] == "DELETED":
                            cache.items.pop(key(item), None)
                        else:
                            cache.items[key(item)] = item
                    self._wake.set()
            except Exception as error:  # the API server restarting, a relist after expiry
                if not self._stop.is_set():
                    log.debug("watch restarts: %s", error)
                    time.sleep(0.5)

    def _watch_pods(self, namespace: str) -> None:
        core = k8s.CoreV1Api(self._client())

        def lister(**kwargs: Any) -> Any:
            return core.list_namespaced_pod(namespace, label_selector=SELECTOR, **kwargs)

        self._watch(self.pods, lambda pod: str(pod["metadata"]["uid"]), lister)

    def _watch_lbs(self, namespace: str) -> None:
        custom = k8s.CustomObjectsApi(self._client())

        def lister(**kwargs: Any) -> Any:
            return custom.list_namespaced_custom_object(
                "layerlb.dev", "v1alpha1", namespace, "loadbalancers", **kwargs
            )

        def key(lb: dict[str, Any]) -> str:
            return f"{lb['metadata']['namespace']}/{lb['metadata']['name']}"

        self._watch(self.loadbalancers, key, lister)

    # ---------------------------------------------------------------------------------------- loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FAST_PROBE)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._reconcile()
            except Exception:
                log.exception("pod runner pass failed; retrying")

    def _reconcile(self) -> None:
        current = self.pods.snapshot()
        for uid in list(self.running):
            pod = current.get(uid)
            if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
                self._stop_pod(self.running.pop(uid))
        for uid, pod in current.items():
            if uid in self.running or uid in self.refused:
                continue
            if (pod.get("metadata") or {}).get("deletionTimestamp"):
                continue
            if ((pod.get("status") or {}).get("phase") or "Pending") != "Pending":
                continue  # another runner's, or one that ran before a restart of this one
            self.seen.setdefault(uid, time.monotonic())
            self._start(pod)
        now = time.monotonic()
        for running in self.running.values():
            self._tend(running, now)
        self._route()

    # ------------------------------------------------------------------------------------ starting

    def _lb(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        meta = pod["metadata"]
        name = (meta.get("labels") or {}).get(LB_LABEL)
        return self.loadbalancers.snapshot().get(f"{meta['namespace']}/{name}")

    def _start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid, namespace, name = str(meta["uid"]), str(meta["namespace"]), str(meta["name"])
        lb = self._lb(pod)
        if lb is None:
            return  # not seen yet: the next pass
        vip = (lb.get("status") or {}).get("vip")
        architecture = (lb.get("spec") or {}).get("architecture", "proxy")
        host_network = bool((pod.get("spec") or {}).get("hostNetwork"))
        if not vip and architecture not in KERNEL_ARCHITECTURES:
            return  # a VIP to put on the pod comes with the LoadBalancer's status
        if host_network:
            placed = self._take_node(uid, _host_ports(pod))
            if placed is None:
                return  # no node without a clash of host ports: Pending, like the scheduler leaves it
            host = placed
        else:
            self.started += 1
            host = self.lab.attach("pod", f"pod-{self.started}-{name[-5:]}")
        try:
            launch = pods.launch(
                pod, host_ip=host.address, pod_ip=host.address, api_host=API_HOST, api_port=API_PORT
            )
        except pods.PodError as error:
            self._release_host(host, host_network, uid)
            self.refused[uid] = str(error)
            self._patch_status(namespace, name, {"status": {"message": str(error), "reason": "RunnerError"}})
            log.error("pod %s/%s cannot run: %s", namespace, name, error)
            return
        running = Running(
            uid=uid,
            namespace=namespace,
            name=name,
            lb=str(lb["metadata"]["name"]),
            launch=launch,
            host=host,
            node=host_network,
            token_dir=self.workdir / "pods" / uid / "serviceaccount" if launch.automount_token else None,
            log_path=self.workdir / "logs" / f"{namespace}_{name}.log",
        )
        try:
            for key, value in launch.sysctls:
                host.namespace.sysctl(key, value)
            if vip and architecture not in KERNEL_ARCHITECTURES:
                # The data plane binds the VIP: a pod's loopback, or the node's for a transparent proxy.
                host.namespace.ip("addr", "add", f"{vip}/32", "dev", "lo")
                running.vip_on_host = vip
            self._write_token(running)
            self._spawn(running)
        except Exception:
            self._release(running)
            raise
        self.running[uid] = running
        self._report(running)
        waited = running.spawned - self.seen.pop(uid, running.spawned)
        log.info(
            "started %s/%s in %s (%s), %.2f s after it was seen",
            namespace,
            name,
            host.name,
            host.address,
            waited,
        )

    def _take_node(self, uid: str, ports: set[int]) -> Host | None:
        """A node for a host-network pod: an empty one (or, with `max_nodes`, one where none of its
        host ports is in use), else a new node while there may be more; None: none fits."""
        for node, held in self.nodes.items():
            in_use = {port for others in held.values() for port in others}
            if (not held) if self.max_nodes is None else not (ports & in_use):
                held[uid] = ports
                return self.node_hosts[node]
        if self.max_nodes is not None and len(self.nodes) >= self.max_nodes:
            return None
        host = self.lab.attach("node", f"node-{len(self.nodes) + 1}")
        self.nodes[host.name] = {uid: ports}
        self.node_hosts[host.name] = host
        return host

    def _release_host(self, host: Host, node: bool, uid: str) -> None:
        if node:
            self.nodes[host.name].pop(uid, None)
        else:
            self.lab.detach(host, "pod")

    def _write_token(self, running: Running) -> None:
        """A token bound to the pod from the TokenRequest API, with ca.crt and namespace, as kubelet projects them."""
        if running.token_dir is None:
            return
        core: Any = k8s.CoreV1Api(self.api)
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": TOKEN_SECONDS,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": running.name,
                    "uid": running.uid,
                },
            },
        }
        answer = core.create_namespaced_service_account_token(
            running.launch.service_account, running.namespace, request
        )
        roots = core.read_namespaced_config_map("kube-root-ca.crt", running.namespace)
        folder = running.token_dir
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        files = {"token": answer.status.token, "ca.crt": roots.data["ca.crt"], "namespace": running.namespace}
        for filename, text in files.items():
            temporary = folder / f".{filename}.tmp"
            temporary.write_text(text)
            os.chown(temporary, running.launch.uid, running.launch.gid)
            temporary.chmod(0o600 if filename == "token" else 0o644)
            temporary.replace(folder / filename)
        running.token_refresh = time.monotonic() + TOKEN_SECONDS * 0.8

    def _spawn(self, running: Running) -> None:
        argv = ["ip", "netns", "exec", running.host.name, *pods.wrapper(running.launch, running.token_dir)]
        argv[0] = shutil.which("ip") or "ip"
        with running.log_path.open("ab") as out:
            out.write(f"--- {_now()} start: {' '.join(running.launch.argv)}\n".encode())
            out.flush()
            running.process = subprocess.Popen(
                argv,
                env=running.launch.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        running.started_at = _now()
        running.spawned = time.monotonic()
        running.ready = running.ever_ready = False
        running.next_readiness = time.monotonic() + FAST_PROBE
        running.next_liveness = time.monotonic() + (
            running.launch.liveness.period if running.launch.liveness else 0
        )
        running.liveness_failures = 0

    # ----------------------------------------------------------------------------------- tending

    def _tend(self, running: Running, now: float) -> None:
        process = running.process
        if process is None:
            if now >= running.restart_at:
                running.restarts += 1
                self._spawn(running)
                self._report(running)
            return
        if process.poll() is not None:
            log.warning(
                "%s/%s exited with %s; restarting", running.namespace, running.name, process.returncode
            )
            running.process = None
            running.ready = False
            running.restart_at = now + min(30.0, 2.0**running.restarts)
            self._report(running)
            return
        if running.token_dir is not None and now >= running.token_refresh:
            self._write_token(running)
        self._probe_readiness(running, now)
        self._probe_liveness(running, now)

    def _probe_readiness(self, running: Running, now: float) -> None:
        probe = running.launch.readiness
        if probe is None:
            if not running.ready:
                running.ready = running.ever_ready = True
                running.ready_since = _now()
                self._report(running)
            return
        if running.probing is not None and running.probing.done():
            ok = running.probing.result()
            running.probing = None
            if ok != running.ready:
                if ok and not running.ever_ready:
                    log.info("%s/%s ready %.2f s after its start", running.namespace, running.name,
                             time.monotonic() - running.spawned)  # fmt: skip
                running.ready = ok
                running.ready_since = _now()
                running.ever_ready |= ok
                self._report(running)
        if running.probing is None and now >= running.next_readiness:
            running.probing = self.probes.submit(_http_ok, running.host.address, probe)
            running.probing.add_done_callback(lambda _: self._wake.set())  # act on the verdict at once
            running.next_readiness = now + (probe.period if running.ever_ready else FAST_PROBE)

    def _probe_liveness(self, running: Running, now: float) -> None:
        probe = running.launch.liveness
        # Counted only once the container has been ready: a start slower than the liveness budget (as
        # under emulation) is not a hung process; the runner stands in for a startupProbe here.
        if probe is None or running.process is None or not running.ever_ready:
            return
        if running.probing_liveness is not None and running.probing_liveness.done():
            ok = running.probing_liveness.result()
            running.probing_liveness = None
            running.liveness_failures = 0 if ok else running.liveness_failures + 1
            if running.liveness_failures >= probe.failures:
                log.warning("%s/%s failed its liveness probe; killing it", running.namespace, running.name)
                _terminate(running.process, 0)
        if running.probing_liveness is None and now >= running.next_liveness:
            running.probing_liveness = self.probes.submit(_http_ok, running.host.address, probe)
            running.next_liveness = now + probe.period

    def _report(self, running: Running) -> None:
        """Patches the pod's status like a kubelet: Running, addresses, container state, Ready."""
        ready = "True" if running.ready else "False"
        alive = running.process is not None
        state: dict[str, Any] = (
            {"running": {"startedAt": running.started_at}}
            if alive
            else {"waiting": {"reason": "CrashLoopBackOff", "message": "restarting"}}
        )
        since = running.ready_since or running.started_at
        status = {
            "phase": "Running",
            "hostIP": running.host.address if running.node else network.ROUTER_LAN,
            "hostIPs": [{"ip": running.host.address if running.node else network.ROUTER_LAN}],
            "podIP": running.host.address,
            "podIPs": [{"ip": running.host.address}],
            "startTime": running.started_at,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": running.started_at},
                {"type": "Initialized", "status": "True", "lastTransitionTime": running.started_at},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": since},
                {"type": "Ready", "status": ready, "lastTransitionTime": since},
            ],
            "containerStatuses": [
                {
                    "name": "dataplane",
                    "image": "layerlb-runner/venv",
                    "imageID": "",
                    "containerID": f"runner://{running.process.pid if running.process else 0}",
                    "ready": running.ready,
                    "started": alive,
                    "restartCount": running.restarts,
                    "state": state,
                }
            ],
        }
        text = json.dumps(status, sort_keys=True)
        if text == running.reported:
            return
        if self._patch_status(running.namespace, running.name, {"status": status}):
            running.reported = text

    def _patch_status(self, namespace: str, name: str, body: dict[str, Any]) -> bool:
        try:
            k8s.CoreV1Api(self.api).patch_namespaced_pod_status(name, namespace, body)
        except k8s.ApiException as error:
            if error.status != 404:
                log.warning("status of %s/%s: %s", namespace, name, error.reason)
            return False
        return True

    # ---------------------------------------------------------------------------------- routing

    def _route(self) -> None:
        """Each VIP at the router: to the pods (nodes, for host-network pods) that pass readiness."""
        lbs = self.loadbalancers.snapshot()
        hops: dict[str, set[str]] = {}
        for running in self.running.values():
            vip = ((lbs.get(f"{running.namespace}/{running.lb}") or {}).get("status") or {}).get("vip")
            if vip:
                hops.setdefault(vip, set())
                if running.ready:
                    hops[vip].add(running.host.address)
        for vip in self.lab.routes():
            hops.setdefault(vip, set())
        for vip, addresses in hops.items():
            self.lab.route_vip(vip, tuple(addresses))

    # ---------------------------------------------------------------------------------- stopping

    def _stop_pod(self, running: Running) -> None:
        log.info("stopping %s/%s", running.namespace, running.name)
        running.stopping = True
        running.ready = False
        process = running.process
        grace = MAX_GRACE

        def stop() -> None:
            if process is not None:
                _terminate(process, grace)
            self._release(running)

        self.stopping.add(self.stoppers.submit(stop))

    def _release(self, running: Running) -> None:
        if running.vip_on_host and running.node:
            with contextlib.suppress(Exception):
                running.host.namespace.ip("addr", "del", f"{running.vip_on_host}/32", "dev", "lo")
        self._release_host(running.host, running.node, running.uid)
        if running.token_dir is not None:
            shutil.rmtree(running.token_dir.parent, ignore_errors=True)

    def pods_of_all(self) -> list[Running]:
        """Every running pod (safe to call from another thread)."""
        return list(self.running.values())

    def pods_of(self, lb: str) -> list[Running]:
        """The running pods of LoadBalancer `lb` (safe to call from another thread)."""
        return [running for running in list(self.running.values()) if running.lb == lb]

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Whether every stop in flight has finished within `timeout` (for tests that check cleanup)."""
        done, pending = concurrent.futures.wait(list(self.stopping), timeout=timeout)
        self.stopping -= done
        return not pending

    def close(self) -> None:
        """Stops every pod's processes and the runner's threads, then removes the lab (if it made it)."""
        self._stop.set()
        self._wake.set()
        self.loop.join(10)
        for running in list(self.running.values()):
            if running.process is not None:
                _terminate(running.process, 10)
        self.running.clear()
        self.stoppers.shutdown(wait=True)
        self.probes.shutdown(wait=False, cancel_futures=True)
        self.relay.close()
        if self.own_lab:
            self.lab.close()

    def __enter__(self) -> PodRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the process group, SIGKILL after `grace` seconds; reaps it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # probes never go through a proxy


def _http_ok(address: str, probe: pods.Probe) -> bool:
    """An httpGet probe: a 2xx or 3xx answer within the timeout (run in the router's namespace)."""
    url = f"http://{address}:{probe.port}{probe.path}"
    try:
        with _DIRECT.open(url, timeout=probe.timeout) as answer:
            return 200 <= int(answer.status) < 400
    except urllib.error.HTTPError as error:
        return 200 <= error.code < 400
    except OSError:
        return False


def _host_ports(pod: dict[str, Any]) -> set[int]:
    """The node ports a host-network pod takes: its containers' ports (hostPort defaults to them)."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return {
        int(port.get("hostPort") or port["containerPort"])
        for container in containers
        for port in container.get("ports") or []
        if isinstance(port.get("containerPort"), int)
    }

"""The forwarding process: Plans from a source become listening sockets, proxies and health checks.

`Dataplane` is the one code path of `layerlb serve` (LoadBalancer YAML) and `layerlb dataplane` (Plan JSON):
each LoadBalancer is an `Instance` with its own Registry, Snapshot, metrics and health checker. With
several workers, `workers.Supervisor` runs one `Dataplane` per worker process and feeds it Plans.

Reload semantics (a new Plan from the source, SIGHUP, or the parent):
- everything that can fail is done first (bind new sockets, check certificates); a failure rejects that
  LoadBalancer's new Plan with one logged line, and its old Plan keeps serving untouched;
- then the Snapshot swaps: `current()` returns the new one, so every new request or connection follows
  the new Plan, while what is open keeps its target (removed targets drain: no new picks);
- listeners that stay keep their socket and server (no close, no re-bind) and get `update(listener)`;
  added listeners start; removed ones stop accepting at once and drain for up to `drain_timeout`.
Kernel architectures (nat, dsr, tunnel) go to an `engines` entry; without one, that LoadBalancer serves
nothing and says so (`/readyz` is 503 with the reason), and the others are unaffected. On exit every
engine's `close()` runs; what stays in the kernel is that engine's documented choice (issue 4, item 5).
What the node lacks though a Plan is served (strict ARP that could not be set, `kernel.strict_arp`) is a
warning, not a problem: `/readyz` stays 200 and the source hears it with what is served.

Graceful stop (SIGTERM, SIGINT): every listener stops accepting at once, open connections and requests
get `drain_timeout` seconds to finish, then the rest are cut and the process exits 0. Health probes run
in this process (`probes.HealthChecker` follows each new Snapshot), or, in a worker (`probe_health`
False), in the parent, whose verdicts arrive through `set_verdicts`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from layerlb import api, plan
from layerlb_dataplane.control import accept, admin, config, probes
from layerlb_dataplane.core.metrics import Dump, Metrics, render
from layerlb_dataplane.core.state import Registry, Snapshot
from layerlb_dataplane.http.proxy import HttpListener
from layerlb_dataplane.kernel import addresses, strict_arp, vip_guard
from layerlb_dataplane.l4.relay import TcpListener, UdpListener
from layerlb_dataplane.net import tls, transparent

log = logging.getLogger("layerlb")

DRAIN_SECONDS = 20.0
BACKLOG = 4096
# In a forwarding pod the VIP reaches the pod's network from outside (an announcement, the network's
# route) and may arrive after the data plane starts: the operator sets LAYERLB_FREEBIND=1 there, and
# listeners bind the VIP before it is local (IP_FREEBIND, HAProxy's `freebind`), serving once it arrives.
# Standalone (`layerlb serve`), an address that is not on the host stays an error.
FREEBIND_ENV = "LAYERLB_FREEBIND"
# A pod-network forwarding pod gets the VIP's packets through kube-proxy (the LoadBalancer's VIP Service),
# which rewrites the destination to the pod's own address: the operator sets LAYERLB_BIND_ANY=1 there,
# and listeners take every address of the pod (it serves one VIP, so nothing else shares its ports).
BIND_ANY_ENV = "LAYERLB_BIND_ANY"
_IP_FREEBIND = 15  # linux/in.h; Python 3.11's socket module does not name it
_IPV6_FREEBIND = 78  # linux/in6.h
HOUSEKEEPING_SECONDS = 1.0

ListenerKey = tuple[str, int, str]  # (vip, port, protocol)


class KernelDriver(Protocol):
    """What the runtime needs for a kernel architecture (`kernel.driver.Driver` is one): apply a Snapshot, and
    stop. The engine it drives is a `kernel.KernelEngine`."""

    async def apply(self, snapshot: Snapshot) -> None:
        """Program the kernel for `snapshot` (desired state: only the difference is written)."""
        ...

    async def close(self, remove: bool = False) -> None:
        """Stop programming; `remove` when the Plan left (the LoadBalancer is gone), not on process stop."""
        ...


Engines = Mapping[api.Architecture, Callable[[plan.Plan], KernelDriver]]


class BindError(Exception):
    """A listener's address cannot be bound; the message is the one line the user reads."""


def _reason(error: OSError) -> str:
    if error.errno == errno.EADDRNOTAVAIL:
        return "the address is not on this host"
    if error.errno == errno.EADDRINUSE:
        return "the port is already in use"
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    return error.strerror or str(error)


def bind(p: plan.Plan, listener: plan.Listener, *, reuse_port: bool = True) -> socket.socket:
    """A bound (and, for TCP, listening) non-blocking socket for `listener` on the Plan's VIP.

    With `reuse_port` (how the workers share a port) the socket joins others of this user on the port;
    without it, it is a probe that fails while anything else holds the port.
    """
    family = socket.AF_INET6 if ":" in p.vip else socket.AF_INET
    tcp = listener.transport == "TCP"
    sock = socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        if tcp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if os.environ.get(FREEBIND_ENV) == "1":
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        any_address = "::" if family == socket.AF_INET6 else "0.0.0.0"
        sock.bind((any_address if os.environ.get(BIND_ANY_ENV) == "1" else p.vip, listener.port))
        if tcp and reuse_port:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        where = f"[{p.vip}]" if ":" in p.vip else p.vip
        raise BindError(
            f"cannot listen on {where}:{listener.port}/{listener.transport} "
            f"({p.key} listener {listener.name}): {_reason(error)}"
        ) from None
    return sock


def probe(p: plan.Plan, listeners: Iterable[plan.Listener]) -> None:
    """Raise `BindError` when one of `listeners` cannot be bound now (address absent, port held elsewhere)."""
    for listener in listeners:
        bind(p, listener, reuse_port=False).close()


def _address(p: plan.Plan, listener: plan.Listener) -> tuple[str, int, str]:
    return (p.vip, listener.port, listener.transport)


def listener_key(p: plan.Plan, listener: plan.Listener) -> ListenerKey:
    """What identifies a served listener across reloads: a change of address or protocol needs a new socket."""
    return (p.vip, listener.port, str(listener.protocol))


def check(plans: Sequence[plan.Plan]) -> None:
    """Refuse Plans that cannot share one process: two LoadBalancers on one VIP, port and transport."""
    owners: dict[tuple[str, int, str], str] = {}
    lines = []
    for p in plans:
        if p.architecture in api.KERNEL_ARCHITECTURES:
            continue
        for listener in p.listeners:
            address = (p.vip, listener.port, listener.transport)
            other = owners.setdefault(address, p.key)
            if other != p.key:
                lines.append(
                    f"{p.key}: listener {listener.name}: {p.vip}:{listener.port}/{listener.transport} is also a listener of {other}"
                )
    if lines:
        raise config.InvalidConfig(lines)


Handler = HttpListener | TcpListener | UdpListener


@dataclass(eq=False)
class Served:
    """One listener being served: its socket (kept across reloads), its handler and, for TCP, its server."""

    listener: plan.Listener
    sock: socket.socket
    handler: Handler
    server: accept.Acceptor | None = None
    certificates: tls.CertificateStore | None = None


@dataclass(eq=False)
class Instance:
    """One LoadBalancer in this process: the state that survives its reloads."""

    key: str
    registry: Registry = field(default_factory=Registry)
    metrics: Metrics = field(default_factory=Metrics)
    snapshot: Snapshot | None = None
    desired: plan.Plan | None = None
    served: dict[ListenerKey, Served] = field(default_factory=dict)
    problem: str | None = None  # why `desired` is not (fully) what is served
    engine: KernelDriver | None = None
    health: probes.HealthChecker = field(default_factory=probes.HealthChecker)
    loopback_vip: str | None = None  # a transparent Plan's VIP this process put on the node's loopback
    arp_warning: str | None = None  # transparent: strict ARP could not be set before the VIP went on lo
    guarded: plan.Plan | None = None  # transparent: the Plan whose VIP guard this process loaded
    guard_warning: str | None = None  # transparent: the VIP guard could not be loaded

    def current(self) -> Snapshot:
        """The Snapshot new requests and connections are served from."""
        assert self.snapshot is not None
        return self.snapshot

    def dump(self) -> Dump:
        """The metrics of this LoadBalancer, with the gauges its Snapshot knows."""
        dump = self.metrics.dump()
        if self.snapshot is not None:
            pools = self.snapshot.pools.values()
            dump["endpoints"] = [[pool.name, pool.ready_count(), len(pool.targets)] for pool in pools]
            dump["generation"] = self.snapshot.generation
        return dump


class Dataplane:
    """Serves every Plan of a source in this process and applies their changes in place."""

    def __init__(
        self,
        source: config.PlanSource,
        *,
        engines: Engines | None = None,
        drain_timeout: float = DRAIN_SECONDS,
        admin_address: tuple[str, int] | None = None,
        probe: bool = True,
        probe_health: bool = True,
        on_applied: Callable[[list[str]], None] | None = None,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ) -> None:
        """`probe`: check that new addresses are free before joining them (off in workers: the parent did).
        `probe_health`: run the active health probes here (off in workers: the parent probes for all)."""
        self.source = source
        self.probe_health = probe_health
        self.verdicts: dict[str, list[probes.Verdict]] = {}  # the parent's, by LoadBalancer key
        self.engines: Engines = engines or {}
        self.drain_timeout = drain_timeout
        self.admin_address = admin_address
        self.probe = probe
        self.on_applied = on_applied
        self.signals = signals
        self.instances: dict[str, Instance] = {}
        self.draining: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self.reloading = asyncio.Event()
        self.admin: admin.AdminServer | None = None
        self.transparent_routing = False  # set up once per process, for the first transparent Plan
        # A transparent VIP goes on the node's loopback: with strict ARP (the operator's pods) the node must
        # not answer ARP for it, as the kernel engines do (`strict_arp`).
        self.strict_arp = strict_arp.StrictArp() if strict_arp.enabled() else None
        # ... and only its listeners' ports may reach the node through it, as with the kernel engines.
        self.vip_guard = vip_guard.VipGuard()
        self.reported_warnings: list[str] = []

    # --- what the admin server shows -----------------------------------------------------------------

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every LoadBalancer's current Plan is fully applied; else the reasons."""
        problems = [inst.problem for inst in self.instances.values() if inst.problem is not None]
        if not self.instances:
            problems.append(f"no LoadBalancer to serve (yet) from {self.source.description}")
        return (bool(self.instances) and not problems and not self.stopping.is_set(), problems)

    def dumps(self) -> list[tuple[str, Dump]]:
        """Every LoadBalancer's metrics, as a worker sends them to its parent."""
        return [(key, inst.dump()) for key, inst in sorted(self.instances.items())]

    async def metrics_text(self) -> str:
        """The Prometheus exposition of this process (`/metrics`)."""
        return render(self.dumps())

    def serving(self) -> dict[str, int]:
        """LoadBalancer key → generation, for each whose latest Plan is fully applied (kernel: synced)."""
        return {
            key: inst.snapshot.plan.generation
            for key, inst in self.instances.items()
            if inst.problem is None and inst.snapshot is not None and inst.snapshot.plan == inst.desired
        }

    def warnings(self) -> list[str]:
        """What the node lacks though the Plans are served (the engines' and the transparent proxy's strict
        ARP warnings), each once, for the serving report."""
        found: list[str] = []
        for _, inst in sorted(self.instances.items()):
            engine_warnings = getattr(inst.engine, "warnings", ()) if inst.engine is not None else ()
            own = [warning for warning in (inst.arp_warning, inst.guard_warning) if warning]
            for warning in (*engine_warnings, *own):
                if warning not in found:
                    found.append(warning)
        return found

    def plans(self) -> list[plan.Plan]:
        """The Plans being served (a rejected newer Plan is not among them)."""
        return [inst.snapshot.plan for _, inst in sorted(self.instances.items()) if inst.snapshot is not None]

    # --- running ---------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or `request_stop`); 0 after a graceful stop, 2 invalid input, 1 bind failure."""
        loop = asyncio.get_running_loop()
        for signum in self.signals:  # none when embedded (tests, threads): the embedder stops it
            loop.add_signal_handler(signum, self.request_stop)
        if self.signals:
            loop.add_signal_handler(signal.SIGHUP, self.reloading.set)
        if self.admin_address is not None:  # first: liveness holds while the source is awaited
            try:
                self.admin = await admin.start(self, self.admin_address)
            except OSError as error:
                host, port = self.admin_address
                log.error("cannot listen for the admin server on %s:%d: %s", host, port, _reason(error))
                return 1
        if not await started(self.source, self.stopping):
            await self.stop(0)
            return 0
        try:
            plans = self.source.load()
            check(plans)
        except config.InvalidConfig as error:
            for line in error.lines:  # exactly what `layerlb validate` prints
                print(line, file=sys.stderr)
            await self.stop(0)
            return 2
        fatal = await self.apply(plans, initial=True)
        if fatal is not None:
            log.error("%s", fatal)
            await self.stop(0)
            return 1
        housekeeping = asyncio.create_task(self._housekeeping())
        try:
            while not self.stopping.is_set():
                await self._next_change()
                if self.stopping.is_set():
                    break
                await self.reload()
        finally:
            housekeeping.cancel()
        await self.stop(self.drain_timeout)
        return 0

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self.stopping.set()

    async def _next_change(self) -> None:
        waits = [
            asyncio.ensure_future(self.stopping.wait()),
            asyncio.ensure_future(self.reloading.wait()),
            asyncio.ensure_future(self.source.changed()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self.reloading.clear()

    async def reload(self) -> None:
        """Read the source again and apply it; an invalid source is logged and changes nothing."""
        try:
            plans = self.source.load()
            check(plans)
        except config.InvalidConfig as error:
            log.error("reload rejected, the current Plans keep serving:")
            for line in error.lines:
                log.error("  %s", line)
            return
        try:
            await self.apply(plans)
        except Exception:  # a bug in a handler's update must not take every LoadBalancer down
            log.exception("reload failed part-way; the listeners not reached keep their previous settings")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            for inst in self.instances.values():
                inst.registry.forget_drained()
            # The engines re-sync in the background: a warning that appears or clears there is reported too.
            if self.warnings() != self.reported_warnings:
                self._report()

    async def stop(self, timeout: float) -> None:
        """Stop accepting everywhere, let open connections finish for up to `timeout`, stop probes and engines."""
        self.stopping.set()
        if self.admin is not None:
            self.admin.close()
        for inst in self.instances.values():
            for served in inst.served.values():
                self._retire(served, timeout)
            inst.served.clear()
            await inst.health.aclose()
            if inst.engine is not None:
                await inst.engine.close()
        if self.draining:
            await asyncio.gather(*self.draining, return_exceptions=True)

    # --- applying Plans ----------------------------------------------------------------------------------

    async def apply(self, plans: Sequence[plan.Plan], *, initial: bool = False) -> str | None:
        """Make `plans` what is served. Returns the first bind failure when `initial` (the caller exits 1)."""
        wanted = {p.key: p for p in plans}
        for key in [key for key in self.instances if key not in wanted]:
            inst = self.instances.pop(key)
            log.info("%s: removed: its listeners stop accepting and drain", key)
            for served in inst.served.values():
                self._retire(served, self.drain_timeout)
            await inst.health.aclose()
            if inst.engine is not None:
                await inst.engine.close(remove=True)
            await self._release_loopback(inst)
            await self._release_guard(inst)
        fatal = None
        for key, p in wanted.items():
            inst = self.instances.get(key) or self._instance(key)
            problem = await self._apply(inst, p)
            if problem is not None:
                if initial and inst.snapshot is None:
                    fatal = fatal or problem  # the caller says it once and exits
                else:
                    log.error("%s", problem)
        for key, inst in self.instances.items():  # new targets take the prober's verdicts at once
            if key in self.verdicts:
                inst.health.apply(self.verdicts[key])
        if self.on_applied is not None:
            self.on_applied([inst.problem for inst in self.instances.values() if inst.problem])
        if fatal is None:
            self._report()
        return fatal

    def _report(self) -> None:
        self.reported_warnings = self.warnings()
        self.source.applied(self.serving(), self.reported_warnings)

    def set_verdicts(self, verdicts: dict[str, list[probes.Verdict]]) -> None:
        """The active health verdicts of every LoadBalancer, from the prober in the parent (all of them)."""
        self.verdicts = verdicts
        for key, inst in self.instances.items():
            inst.health.apply(verdicts.get(key, []))

    def _instance(self, key: str) -> Instance:
        inst = self.instances[key] = Instance(key)

        def changed(target: object) -> None:  # a kernel engine reprograms weights on health changes
            if inst.engine is not None and inst.snapshot is not None:
                task = asyncio.get_running_loop().create_task(inst.engine.apply(inst.snapshot))
                self.draining.add(task)
                task.add_done_callback(self.draining.discard)

        inst.health = probes.HealthChecker(on_change=changed, probing=self.probe_health)
        return inst

    async def _apply(self, inst: Instance, new: plan.Plan) -> str | None:
        if new == inst.desired and inst.problem is None:
            return None  # the same Plan again: nothing to do
        first = inst.snapshot is None
        inst.desired = new
        if new.architecture in api.KERNEL_ARCHITECTURES:
            return await self._apply_kernel(inst, new)
        if inst.engine is not None:  # a kernel Plan became a proxy one
            await inst.engine.close(remove=True)
            inst.engine = None
        if new.architecture is api.Architecture.transparent and not self.transparent_routing:
            # Without it the backends' replies to client addresses never reach the upstream sockets.
            try:
                await asyncio.to_thread(transparent.setup_routing)
            except (transparent.RoutingError, OSError) as error:
                inst.problem = f"{inst.key}: transparent proxying needs policy routing: {_message(error)}"
                return inst.problem
            self.transparent_routing = True
        if new.architecture is api.Architecture.transparent:  # guarded before its VIP is on the node
            guarded = await asyncio.to_thread(self.vip_guard.ensure, new)
            inst.guarded, inst.guard_warning = new, guarded.warning
        if new.architecture is api.Architecture.transparent and inst.loopback_vip != new.vip:
            # The transparent proxy runs on the node's network, where its VIP's packets arrive: the VIP must
            # be local there (as the kernel engines make it), or the node forwards them instead.
            await self._release_loopback(inst)
            try:
                if self.strict_arp is not None and ":" not in new.vip:  # before the VIP is there to answer
                    checked = await asyncio.to_thread(self.strict_arp.check)
                    inst.arp_warning = checked.warning
                if await asyncio.to_thread(addresses.add_to_loopback, new.vip):
                    inst.loopback_vip = new.vip
            except OSError as error:
                inst.problem = f"{inst.key}: {_message(error)}"
                return inst.problem
        elif new.architecture is not api.Architecture.transparent:
            await self._release_loopback(inst)
            await self._release_guard(inst)
        wanted = {listener_key(new, listener): listener for listener in new.listeners}
        ours = {
            _address(i.current().plan, s.listener) for i in self.instances.values() for s in i.served.values()
        }
        added: dict[ListenerKey, socket.socket] = {}
        try:  # everything that can fail, before anything changes
            for key, listener in wanted.items():
                if key in inst.served:
                    old = inst.served[key]
                    if old.certificates is not None and old.listener.certificates != listener.certificates:
                        tls.CertificateStore(listener.certificates)  # raises on a bad pair
                    continue
                if self.probe and _address(new, listener) not in ours:
                    probe(new, [listener])
                added[key] = bind(new, listener)
                if listener.protocol == api.Protocol.HTTPS:
                    tls.CertificateStore(listener.certificates)
        except Exception as error:
            for sock in added.values():
                sock.close()
            inst.problem = (
                (str(error) if isinstance(error, BindError) else f"{inst.key}: {_message(error)}")
                if first
                else f"{inst.key} generation {new.generation} not applied: {_message(error)}; the previous Plan keeps serving"
            )
            return inst.problem
        inst.snapshot = inst.registry.snapshot(new)
        for key, served in inst.served.items():
            changed = wanted.get(key)
            if changed is not None and changed != served.listener:
                served.handler.update(changed)
                if served.certificates is not None and changed.certificates != served.listener.certificates:
                    served.certificates.update(changed.certificates)
                served.listener = changed
        for key in [key for key in inst.served if key not in wanted]:
            self._retire(inst.served.pop(key), self.drain_timeout)
        problem = None
        for key, sock in added.items():
            try:
                inst.served[key] = await self._serve(inst, wanted[key], sock)
            except Exception as error:  # a proxy that cannot start: this listener only
                sock.close()
                problem = (
                    problem or f"{inst.key}: listener {wanted[key].name} cannot start: {_message(error)}"
                )
        inst.health.follow(inst.snapshot)
        inst.problem = problem
        if problem is None:
            log.info("%s: generation %d applied (%d listeners)", inst.key, new.generation, len(inst.served))
        return problem

    async def _apply_kernel(self, inst: Instance, new: plan.Plan) -> str | None:
        for served in inst.served.values():  # a proxy Plan became a kernel one
            self._retire(served, self.drain_timeout)
        inst.served.clear()
        inst.snapshot = inst.registry.snapshot(new)
        inst.health.follow(inst.snapshot)
        factory = self.engines.get(new.architecture)
        if factory is None:
            inst.problem = (
                f"{inst.key}: the kernel engine for architecture {new.architecture} is not available yet: "
                "serving nothing for it"
            )
            return inst.problem
        try:
            if inst.engine is None:
                inst.engine = factory(new)
            await inst.engine.apply(inst.snapshot)
            log.info(
                "%s: generation %d applied by the %s kernel engine", inst.key, new.generation, new.engine
            )
        except Exception as error:
            inst.problem = (
                f"{inst.key} generation {new.generation} not applied by the kernel engine: {_message(error)}"
            )
            return inst.problem
        inst.problem = None
        return None

    async def _release_loopback(self, inst: Instance) -> None:
        inst.arp_warning = None
        if inst.loopback_vip is not None:
            await asyncio.to_thread(addresses.remove_from_loopback, inst.loopback_vip)
            inst.loopback_vip = None

    async def _release_guard(self, inst: Instance) -> None:
        inst.guard_warning = None
        if inst.guarded is not None:
            await asyncio.to_thread(self.vip_guard.remove, inst.guarded)
            inst.guarded = None

    async def _serve(self, inst: Instance, listener: plan.Listener, sock: socket.socket) -> Served:
        if listener.transport == "UDP":
            udp = UdpListener(listener, inst.current, inst.metrics)
            await udp.start(sock)
            return Served(listener, sock, udp)
        handler: HttpListener | TcpListener
        certificates = None
        if listener.protocol in (api.Protocol.HTTP, api.Protocol.HTTPS):
            if listener.protocol == api.Protocol.HTTPS:
                certificates = tls.CertificateStore(listener.certificates)
            handler = HttpListener(listener, inst.current, inst.metrics)
        else:
            handler = TcpListener(listener, inst.current, inst.metrics)
        tcp = handler
        sock.listen(BACKLOG)  # again when bound listening: harmless
        server = accept.Acceptor(
            sock,
            handler.protocol_factory,
            name=f"{inst.key} listener {listener.name}",
            context=certificates.context if certificates is not None else None,
            on_error=lambda reason: inst.metrics.accept_error(tcp.listener.name, reason),
        )
        return Served(listener, sock, handler, server, certificates)

    def _retire(self, served: Served, timeout: float) -> None:
        """Stop accepting now (the socket closes) and let open connections drain in the background."""
        if served.server is not None:
            served.server.close()
        task = asyncio.get_running_loop().create_task(served.handler.close(timeout))
        self.draining.add(task)
        task.add_done_callback(self.draining.discard)


async def started(source: config.PlanSource, stopping: asyncio.Event) -> bool:
    """Wait for the source's first Plans; False when a stop came first (nothing was served: exit 0)."""
    started = asyncio.ensure_future(source.start())
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({started, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not started.done():
        started.cancel()
        return False
    started.result()
    return True


def _message(error: BaseException) -> str:
    if isinstance(error, BindError):
        return str(error)
    if isinstance(error, NotImplementedError):
        return f"not implemented yet ({error})" if str(error) else "not implemented yet"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__

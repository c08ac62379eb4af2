"""Helpers of the runtime, admin and L4 proxy tests: Plans built directly, a Dataplane in a thread, sockets.

Plans are built as `plan.Plan` objects (not through validation) so tests can use sub-second timeouts.
Every wait is on a condition with a deadline (`wait_until`, `Condition.wait_for`), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from layerlb_dataplane.control import config, runtime

from layerlb import api, plan

if TYPE_CHECKING:
    from tests.dataplane.conftest import LoopThread

TIMEOUT = 20.0


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll `predicate` until it holds, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        time.sleep(0.01)


def free_port(host: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port nothing listens on at `host` now (for both TCP and UDP, so either transport can take it)."""
    while True:
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, other) as twin:
            try:
                twin.bind((host, port))
            except OSError:
                continue
        return port


def make_certificate(directory: Path, label: str, names: list[str]) -> plan.Certificate:
    """A self-signed P-256 certificate whose CN is `label`, so a test can tell which one was served; its
    files stay in `directory` as `LABEL.crt` and `LABEL.key`."""
    key, cert = directory / f"{label}.key", directory / f"{label}.crt"
    san = ",".join(f"DNS:{name}" for name in names) or f"DNS:{label}.invalid"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "2", "-subj", f"/CN={label}", "-addext", f"subjectAltName={san}"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return plan.Certificate(
        source=f"test/{label}", cert_pem=cert.read_text(), key_pem=key.read_text(), names=tuple(names)
    )


def l4_plan(
    vip: str,
    listeners: Sequence[tuple[str, int, str]],
    endpoints: Sequence[int],
    *,
    name: str = "l4",
    generation: int = 1,
    timeouts: plan.Timeouts | None = None,
    proxy_protocol: api.ProxyProtocolVersion | None = None,
    max_connections: int | None = None,
    trusted: Sequence[str] | None = None,
    architecture: api.Architecture = api.Architecture.proxy,
) -> plan.Plan:
    """An L4 Plan: listeners as (name, port, TCP|UDP), one round-robin backend on 127.0.0.1 ports."""
    return plan.Plan(
        name=name,
        namespace="test",
        generation=generation,
        mode=api.Mode.L4,
        architecture=architecture,
        engine=api.Engine.ipvs if architecture in api.KERNEL_ARCHITECTURES else None,
        vip=vip,
        listeners=tuple(
            plan.Listener(
                name=lname,
                port=port,
                protocol=api.Protocol(transport),
                transport="UDP" if transport == "UDP" else "TCP",
                max_connections=max_connections,
                accept_proxy_protocol=plan.AcceptProxyProtocol(trusted_cidrs=tuple(trusted))
                if trusted
                else None,
            )
            for lname, port, transport in listeners
        ),
        backends=(
            plan.Backend(
                name="app",
                algorithm=api.Algorithm.round_robin,
                endpoints=tuple(
                    plan.Endpoint(address="127.0.0.1", port=port, weight=1) for port in endpoints
                ),
                proxy_protocol=proxy_protocol,
            ),
        ),
        default_backend="app",
        timeouts=timeouts or plan.Timeouts(),
    )


class Running:
    """A `runtime.Dataplane` served on the test's event loop thread, fed by a `StaticSource` or any source."""

    def __init__(
        self,
        loop_thread: LoopThread,
        plans: Sequence[plan.Plan] | config.PlanSource,
        *,
        admin: bool = False,
        drain_timeout: float = 5.0,
    ) -> None:
        self.loop_thread = loop_thread
        self.source = plans if isinstance(plans, config.PlanSource) else None
        self.applied = 0
        self.problems: list[str] = []
        self.changed = threading.Condition()

        def applied(problems: list[str]) -> None:
            with self.changed:
                self.applied += 1
                self.problems = problems
                self.changed.notify_all()

        async def make() -> runtime.Dataplane:
            source = self.source or config.StaticSource(plans)  # type: ignore[arg-type]
            self.source = source
            return runtime.Dataplane(
                source,
                drain_timeout=drain_timeout,
                admin_address=("127.0.0.1", 0) if admin else None,
                on_applied=applied,
                signals=(),
            )

        self.dataplane = loop_thread.run(make())
        self.future: concurrent.futures.Future[int] = asyncio.run_coroutine_threadsafe(
            self.dataplane.run(), loop_thread.loop
        )
        self.wait_applied(1)

    def wait_applied(self, count: int, timeout: float = TIMEOUT) -> None:
        """Block until the Dataplane has applied Plans `count` times in all."""
        with self.changed:
            self.changed.wait_for(lambda: self.applied >= count or self.future.done(), timeout)
        if self.applied < count:
            ended = f"it ended with {self.future.result()}" if self.future.done() else "it is still running"
            raise AssertionError(f"the Dataplane did not apply {count} times in time ({ended})")

    def set(self, plans: Sequence[plan.Plan]) -> None:
        """Give the Dataplane new Plans and wait until it applied them."""
        source = self.source
        assert isinstance(source, config.StaticSource)
        before = self.applied
        self.loop_thread.call(lambda: source.set(plans))
        self.wait_applied(before + 1)

    @property
    def admin_url(self) -> str:
        wait_until(lambda: self.dataplane.admin is not None, what="the admin server started")
        host, port = self.loop_thread.call(lambda: self.dataplane.admin.address)  # type: ignore[union-attr]
        return f"http://{host}:{port}"

    def stop(self, timeout: float = TIMEOUT) -> int:
        self.loop_thread.call(self.dataplane.request_stop)
        return self.future.result(timeout)


def http_get(url: str, timeout: float = TIMEOUT) -> tuple[int, str]:
    """(status, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def connect(host: str, port: int, timeout: float = TIMEOUT) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def read_line(sock: socket.socket) -> bytes:
    """Bytes up to and including a newline (the backends' greeting), one recv at a time."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    return data


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def listening_inodes(host: str, port: int) -> list[int]:
    """Inodes of the TCP sockets listening on host:port, from /proc/net/tcp (the kernel's own view)."""
    wanted = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    inodes = []
    with open("/proc/net/tcp", encoding="ascii") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                inodes.append(int(fields[9]))
    return inodes


def closed_by_peer(sock: socket.socket) -> bool:
    """The peer closed (EOF) or aborted (reset) the connection: whichever way a proxy cut it."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True

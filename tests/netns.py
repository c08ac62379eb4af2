"""Network-namespace topologies for tests, so kernel networking (routing, nftables, transparent proxying,
L4 forwarding) is exercised for real without touching the machine's own network.

A `Topology` owns a set of namespaces, the links between them and every process started in them, and
removes all of it on `close()` — also when the test fails (use it as a context manager or a fixture), at
interpreter exit, and, for runs that were killed, on the next run (`remove_stale`). The test process
itself never leaves the root namespace: work inside a namespace runs in a child process started with
`ip netns exec`.

    with Topology("tproxy") as topo:
        client, lb = topo.namespace("client"), topo.namespace("lb")
        topo.link(client, "eth0", lb, "eth0")
        client.addr("eth0", "10.0.1.2/24")
        lb.addr("eth0", "10.0.1.1/24")
        client.route("default via 10.0.1.1")
        server = lb.spawn(serve_forever, "10.0.1.1", 8080)   # a module-level function
        server.wait_for_line("ready", timeout=10)
        assert client.call(fetch, "10.0.1.1", 8080) == b"hello"  # returns the function's (pickled) result
        client.run(["ping", "-c1", "10.0.1.1"])

Functions given to `call` and `spawn` must be importable (defined at module level); their arguments and
result are pickled. The child imports them with the parent's `sys.path`. Names are unique per process and
topology (`llbt-<pid>-<n>-<name>`), so parallel runs and other test suites do not collide. Requires root
(CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pickle
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

PREFIX = "llbt"
_STALE = re.compile(rf"^{PREFIX}-(\d+)-")
_counter = itertools.count(1)

# Runs in the child: imports the function by module and qualified name, calls it with the pickled
# arguments, and pickles the outcome to the file the parent named (only for `call`).
_BOOTSTRAP = """
import importlib, os, pickle, sys, traceback
payload = pickle.load(sys.stdin.buffer)
result_path = payload["result_path"]
try:
    target = importlib.import_module(payload["module"])
    for part in payload["qualname"].split("."):
        target = getattr(target, part)
    outcome = ("ok", target(*payload["args"], **payload["kwargs"]))
except BaseException as error:
    outcome = ("error", f"{type(error).__name__}: {error}", traceback.format_exc())
sys.stdout.flush()
if result_path:
    with open(result_path, "wb") as out:
        try:
            pickle.dump(outcome, out)
        except Exception as error:
            out.seek(0)
            out.truncate()
            pickle.dump(("error", f"unpicklable result: {error!r}", ""), out)
elif outcome[0] == "error":
    sys.stderr.write(outcome[2])
    sys.exit(1)
"""


class NetnsError(RuntimeError):
    """A namespace command failed; the message holds the command and its output, for the test report."""


class RemoteError(NetnsError):
    """A function run in a namespace raised; the message holds its traceback from the child."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {shlex.join(args)}: {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(name: str) -> None:
    """Kills what still runs in one of our namespaces (all started by us), then deletes the namespace."""
    for _ in range(50):
        pids = [int(pid) for pid in _ip("netns", "pids", name, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
    _ip("netns", "del", name, check=False)


def remove_stale() -> list[str]:
    """Deletes namespaces left by test runs that were killed (their pid is gone); returns their names."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _STALE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_namespace(name)
            removed.append(name)
    return removed


class Spawned:
    """A function or command running in the background in a namespace; stopped by the topology at the end.

    stdout is a pipe the test reads with `wait_for_line` (keep the output small: an unread pipe fills up);
    stderr goes to a file, shown in errors.
    """

    def __init__(self, process: subprocess.Popen[bytes], stderr: IO[bytes], what: str) -> None:
        self.process = process
        self.what = what
        self._stderr = stderr
        self._buffer = b""
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        self._stderr.flush()
        return Path(self._stderr.name).read_text(errors="replace")

    def wait_for_line(self, prefix: str, timeout: float = 10.0) -> str:
        """Blocks until the process prints a line starting with `prefix` (e.g. "ready 8080"), which is how
        a server says it listens; raises if it exits first or the deadline passes."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if line.startswith(prefix):
                    self.lines.remove(line)
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetnsError(f"{self.what}: no line starting {prefix!r} in {timeout}s; {self.stderr()}")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                self.process.wait(5)
                raise NetnsError(f"{self.what} exited ({self.process.returncode}): {self.stderr()}")
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        self._stderr.close()
        return self.process.returncode


@dataclass(eq=False)
class Namespace:
    """One network namespace of a topology (or the root namespace, `name` None, for links to the host)."""

    topology: Topology = field(repr=False)
    name: str | None
    short: str

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name] if self.name else []

    def ip(self, *args: str) -> str:
        """Runs `ip ARGS` in this namespace; returns stdout."""
        return _ip(*(["-n", self.name] if self.name else []), *args).stdout

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command in this namespace and waits for it; raises NetnsError on failure if `check`."""
        done = subprocess.run(
            [*self._prefix(), *argv],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout or self.topology.timeout,
        )
        if check and done.returncode != 0:
            raise NetnsError(f"[{self.short}] {shlex.join(argv)} -> {done.returncode}: {done.stderr.strip()}")
        return done

    def addr(self, ifname: str, cidr: str) -> None:
        """Adds an address to an interface and sets it up."""
        self.ip("addr", "add", cidr, "dev", ifname)
        self.ip("link", "set", ifname, "up")

    def route(self, spec: str) -> None:
        """`ip route add SPEC`, e.g. "default via 10.0.2.1" or "10.0.3.0/24 via 10.0.2.3"."""
        self.ip("route", "add", *spec.split())

    def sysctl(self, key: str, value: str | int) -> None:
        """Sets a sysctl of this namespace (net.* are per namespace), e.g. ("net.ipv4.ip_forward", 1)."""
        self.run(["sysctl", "-qw", f"{key}={value}"])

    def popen(self, argv: Sequence[str], what: str | None = None) -> Spawned:
        """Starts a command in the background; the topology stops it on close."""
        stderr = tempfile.NamedTemporaryFile(prefix=f"{PREFIX}-stderr-", delete=True)  # noqa: SIM115
        process = subprocess.Popen(
            [*self._prefix(), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )
        spawned = Spawned(process, stderr, f"[{self.short}] {what or shlex.join(argv)}")
        self.topology.processes.append(spawned)
        return spawned

    def call(self, func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs `func(*args, **kwargs)` in this namespace in a child process and returns its result; raises
        RemoteError with the child's traceback if it raised. Waits at most `topology.timeout` seconds."""
        with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-call-") as directory:
            result_path = os.path.join(directory, "result")
            done = subprocess.run(
                [*self._prefix(), sys.executable, "-c", _BOOTSTRAP],
                input=_payload(func, args, kwargs, result_path),
                capture_output=True,
                timeout=self.topology.timeout,
                env=_child_env(),
                cwd=os.getcwd(),
            )
            what = f"[{self.short}] {func.__module__}.{func.__qualname__}"
            if not os.path.exists(result_path):
                raise RemoteError(f"{what} died ({done.returncode}): {done.stderr.decode(errors='replace')}")
            with open(result_path, "rb") as file:
                outcome = pickle.load(file)
        if outcome[0] == "error":
            raise RemoteError(f"{what} raised {outcome[1]}\n{outcome[2]}")
        result: R = outcome[1]
        return result

    def spawn(self, func: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Spawned:
        """Starts `func(*args, **kwargs)` in the background in this namespace (a server, say); it signals
        readiness by printing a line (flush it) the test waits for with `Spawned.wait_for_line`."""
        stderr = tempfile.NamedTemporaryFile(prefix=f"{PREFIX}-stderr-", delete=True)  # noqa: SIM115
        process = subprocess.Popen(
            [*self._prefix(), sys.executable, "-u", "-c", _BOOTSTRAP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=_child_env(),
            cwd=os.getcwd(),
        )
        assert process.stdin is not None
        process.stdin.write(_payload(func, args, kwargs, None))
        process.stdin.close()
        spawned = Spawned(process, stderr, f"[{self.short}] {func.__qualname__}")
        self.topology.processes.append(spawned)
        return spawned


def _payload(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], result: str | None
) -> bytes:
    module, qualname = func.__module__, func.__qualname__
    if module == "__main__" or "<" in qualname:
        raise TypeError(
            f"{qualname} must be defined at module level in an importable module to run in a namespace"
        )
    return pickle.dumps(
        {"module": module, "qualname": qualname, "args": args, "kwargs": kwargs, "result_path": result}
    )


def _child_env() -> dict[str, str]:
    """The parent's environment with its import path, so the child imports the same modules."""
    paths = [path or os.getcwd() for path in sys.path if path == "" or os.path.isdir(path)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


@dataclass(eq=False)
class Topology:
    """Namespaces, links and processes of one test, all removed on `close()`.

    `tag` goes into the namespace names to tell topologies apart in `ip netns list`; `timeout` bounds each
    `run` and `call`.
    """

    tag: str = "t"
    timeout: float = 30.0
    namespaces: list[Namespace] = field(default_factory=list)
    processes: list[Spawned] = field(default_factory=list)
    closed: bool = False
    id: str = field(init=False)
    root: Namespace = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise NetnsError("network namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        remove_stale()
        self.id = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        self.root = Namespace(self, None, "root")
        atexit.register(self.close)

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close(raise_errors=error is None)

    def namespace(self, name: str) -> Namespace:
        """Creates a namespace with loopback up; `name` is short (e.g. "lb"), the real name is unique."""
        full = f"{self.id}-{self.tag}-{name}"
        _ip("netns", "add", full)
        namespace = Namespace(self, full, name)
        self.namespaces.append(namespace)
        namespace.ip("link", "set", "lo", "up")
        return namespace

    def link(self, a: Namespace, a_ifname: str, b: Namespace, b_ifname: str) -> None:
        """A veth pair between two namespaces (created in place, so names only need to be unique within
        each namespace), both ends up. Use `topology.root` for an end on the host, with a unique name."""
        args = ["link", "add", a_ifname]
        if a.name:
            args += ["netns", a.name]
        args += ["type", "veth", "peer", "name", b_ifname]
        if b.name:
            args += ["netns", b.name]
        _ip(*args)
        a.ip("link", "set", a_ifname, "up")
        b.ip("link", "set", b_ifname, "up")

    def bridge(self, namespace: Namespace, name: str, ports: Sequence[str], cidr: str | None = None) -> None:
        """A bridge in `namespace` joining the given interfaces (one L2 segment), optionally addressed."""
        namespace.ip("link", "add", name, "type", "bridge")
        for port in ports:
            namespace.ip("link", "set", port, "master", name)
        namespace.ip("link", "set", name, "up")
        if cidr:
            namespace.addr(name, cidr)

    def remove(self, namespace: Namespace) -> None:
        """Deletes one namespace of this topology before `close` (a pod that went away, say): kills what
        still runs in it, then deletes it with its interfaces."""
        assert namespace.name is not None
        self.namespaces.remove(namespace)
        _kill_namespace(namespace.name)

    def close(self, raise_errors: bool = False) -> None:
        """Stops every process, then deletes every namespace (which removes their interfaces). Idempotent."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        problems = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception as error:
                problems.append(f"{process.what}: {error}")
        for namespace in reversed(self.namespaces):
            assert namespace.name is not None
            _kill_namespace(namespace.name)
        left = set(_ip("netns", "list", check=False).stdout.split()) & {n.name for n in self.namespaces}
        if left:
            problems.append(f"namespaces not removed: {sorted(n for n in left if n)}")
        if problems and raise_errors:
            raise NetnsError("; ".join(problems))

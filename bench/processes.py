"""Child processes of the bench, so every subject starts pinned, is waited for by polling, never by a
fixed sleep, and is stopped (with everything it forked) even when a row fails.

A subject that cannot start raises `Unavailable` with a reason a person can act on; the harness marks
the row unavailable and goes on with the next one.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# This checkout's packages first: an editable install made elsewhere (a git worktree shares the main
# checkout's venv) would otherwise serve another checkout's data plane to the subjects under test.
SOURCE_PATH = os.pathsep.join(str(REPO / part) for part in ("", "operator", "dataplane"))
POLL_SECONDS = 0.02


class Unavailable(Exception):
    """A subject or scenario could not be measured here; the message says why."""


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the load generator (wrk, helpers, backends) and the subject under test run on.

    On the 2-core machine wrk and the backends share CPU 0 and the subject has CPU 1 to itself, so
    every proxy gets the same CPU budget. `None` leaves scheduling to the kernel.
    """

    load: frozenset[int] | None
    subject: frozenset[int] | None

    @staticmethod
    def choose(enabled: bool) -> Pinning:
        """Split the CPUs this process may use into the load side (first) and the subject (the rest)."""
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled or len(cpus) < 2:
            return Pinning(None, None)
        return Pinning(frozenset(cpus[:1]), frozenset(cpus[1:]))

    def describe(self) -> dict[str, list[int] | None]:
        """The pinning as JSON: CPU lists, or null when not pinned."""
        return {
            "load": sorted(self.load) if self.load is not None else None,
            "subject": sorted(self.subject) if self.subject is not None else None,
        }


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit (children inherit it): 5,000 clients need 10,000+ sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(limit, soft), max(limit, hard)))
            return max(limit, soft)
        except (ValueError, OSError):
            continue
    return soft


def tool(name: str) -> str | None:
    """The path of a system tool (also under /usr/sbin, which a user's PATH may lack), or None."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def require(name: str, package: str | None = None) -> str:
    """The path of a tool the row needs, or `Unavailable` naming the Debian package to install."""
    found = tool(name)
    if found is None:
        hint = package or name
        raise Unavailable(f"{name} is not installed (bash bench/packages.sh installs {hint})")
    return found


def layerlb_command() -> list[str]:
    """How to run the `layerlb` CLI of this checkout: the venv's console script, else `python -m`."""
    script = Path(sys.executable).parent / "layerlb"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "layerlb.cli"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick), for backends and admin servers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def descendants(pid: int) -> list[int]:
    """The processes forked (transitively) by `pid`, read from /proc, so workers are pinned and measured."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; fields after it are fixed.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def pin_tree(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin a process, all its threads and all its descendants to `cpus` (None: leave them be)."""
    if cpus is None:
        return
    for process in [pid, *descendants(pid)]:
        tasks = Path(f"/proc/{process}/task")
        try:
            threads = [int(task.name) for task in tasks.iterdir()]
        except OSError:
            continue
        for thread in threads:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread, cpus)


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat; busy counts softirq, where kernel forwarding runs."""
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            numbers = [int(value) for value in values[:8]]
            idle = numbers[3] + numbers[4]
            ticks[int(name[3:])] = (sum(numbers) - idle, sum(numbers))
    return ticks


def cpu_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[str, float]:
    """Percent busy of each CPU between two `cpu_ticks` readings: which side was the bottleneck."""
    busy = {}
    for cpu, (end_busy, end_total) in after.items():
        start_busy, start_total = before.get(cpu, (0, 0))
        total = end_total - start_total
        busy[str(cpu)] = round(100 * (end_busy - start_busy) / total, 1) if total > 0 else 0.0
    return busy


def listening_inodes(host: str, port: int) -> set[str]:
    """Socket inodes listening on host:port (IPv4), from /proc/net/tcp of this network namespace."""
    (packed,) = struct.unpack("<I", socket.inet_aton(host))
    local = f"{packed:08X}:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":
            inodes.add(fields[9])
    return inodes


def ensure_free(host: str, port: int) -> None:
    """`Unavailable` when something already listens on host:port: with SO_REUSEPORT a stray listener
    (another run, another bench) would silently take part of the load."""
    if listening_inodes(host, port) or listening_inodes("0.0.0.0", port):
        raise Unavailable(f"something else already listens on {host}:{port} (ss -ltnp shows what)")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its descendants, in seconds (0 when gone)."""
    total = 0
    for process in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS), in bytes; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def command_line(pid: int) -> str:
    """A process's command line with spaces, for reports and for telling workers from supervisors."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Process:
    """One started child: its log file, and a stop that takes its whole process group down."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    extra_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 6) -> str:
        """The last lines of the child's output, for the reason of an unavailable row."""
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:] if line.strip())

    def refusal(self) -> str | None:
        """A line where the child says it cannot do what it was started for ("... not available yet"),
        so the harness moves on at once instead of polling until its timeout."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return None
        return next((line.strip() for line in text.splitlines() if "not available" in line), None)

    def exited_reason(self) -> str:
        """Why the child is gone, as one line: its exit code and its last words."""
        code = self.popen.poll()
        return f"{self.name} exited with code {code}: {self.tail() or '(no output)'}"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the child's process group, then SIGKILL whatever is left after `timeout`."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            if self.popen.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(wait)
        # The group is ours (a new session per child): sweep up forked workers that outlived the leader.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait()


def _pinned(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


def start(
    name: str,
    argv: Sequence[str],
    logs: Path,
    cpus: frozenset[int] | None,
    *,
    env: dict[str, str] | None = None,
    stdout: int | None = None,
) -> Process:
    """Start `argv` pinned to `cpus` in a new session (so `stop` reaches its forks), output to a log."""
    log = logs / f"{name}.log"
    handle = log.open("ab")
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else handle,
            stderr=handle,
            start_new_session=True,
            preexec_fn=_pinned(cpus),
            env={**os.environ, "PYTHONPATH": SOURCE_PATH, **(env or {})},
            cwd=REPO,
        )
    except OSError as error:
        raise Unavailable(f"{name} could not start: {error}") from error
    finally:
        handle.close()
    return Process(name, popen, log)


def wait_until(check: Callable[[], bool], timeout: float, what: str, process: Process | None = None) -> float:
    """Poll `check` until it holds; `Unavailable` when `process` exits first or `timeout` passes.

    Returns the seconds it took, which the report keeps as the subject's start-up time.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if process is not None and not process.alive():
            raise Unavailable(process.exited_reason())
        if process is not None and (said := process.refusal()):
            raise Unavailable(f"{process.name}: {said}")
        try:
            if check():
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = (
                f"; {process.name} says: {process.tail()}" if process is not None and process.tail() else ""
            )
            raise Unavailable(f"{what} not ready within {timeout:g} s{tail}")
        time.sleep(POLL_SECONDS)


def accepts(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(
    host: str, port: int, path: str = "/", timeout: float = 5.0, host_header: str = "bench"
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection: (status, body), to check a subject really serves."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise OSError(f"not an HTTP response: {data[:60]!r}")
    return int(head.split(b" ", 2)[1]), body


@contextlib.contextmanager
def running(process: Process) -> Iterator[Process]:
    """Stop `process` when the block ends, however it ends."""
    try:
        yield process
    finally:
        process.stop()


def run_quiet(
    argv: Sequence[str], timeout: float = 30.0, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion, capturing its output as text (never raising on exit codes)."""
    return subprocess.run(
        list(argv),
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH},
    )

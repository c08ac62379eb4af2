"""A `layerlb dataplane --plan FILE` process and the independent client (wrk) the chaos tests drive it with.

The data plane runs as its own process, as in a forwarding pod: its memory is its own (`rss`), a reload is
the pod's (`write` the Plan JSON atomically, then SIGHUP: `config.PlanFile`, the path every Plan source
takes), and its admin server says which generation it serves. wrk counts every failed request itself:
sockets that failed to connect, read or write, timeouts, and answers that were not 2xx/3xx.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from layerlb import plan
from tests.dataplane.helpers_runtime import free_port, http_get, wait_until

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "LAYERLB_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "dataplane"), env.get("PYTHONPATH")])
    )
    return env


class DataplaneProcess:
    """`layerlb dataplane --plan PATH` (given `plans`) or `layerlb serve FILE` (given `serve`), reloaded by
    SIGHUP only; its output goes to a file."""

    started: ClassVar[list[DataplaneProcess]] = []

    def __init__(
        self, tmp_path: Path, plans: list[plan.Plan] | None = None, serve: Path | None = None
    ) -> None:
        self.path = tmp_path / "plan.json"
        if plans is not None:
            self.write(plans)
            command = ["dataplane", "--plan", str(self.path)]
        else:
            assert serve is not None, "plans or a LoadBalancer file to serve"
            command = ["serve", str(serve)]
        self.log = tmp_path / "dataplane.log"
        self.admin_port = free_port("127.0.0.1")
        self.output = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "layerlb.cli", *command,
             "--poll-interval", "3600", "--admin", f"127.0.0.1:{self.admin_port}"],
            stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(),
        )  # fmt: skip
        DataplaneProcess.started.append(self)
        wait_until(self._ready, TIMEOUT, "the data plane ready")

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"exited with {self.process.returncode}:\n{self.text()}"
        return self.get("/readyz")[0] == 200

    def text(self) -> str:
        return self.log.read_text()

    def get(self, path: str) -> tuple[int, str]:
        try:
            return http_get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10)
        except OSError:
            return 0, ""

    def write(self, plans: list[plan.Plan]) -> None:
        """The Plan file replaced at once (a rename, as the kubelet swaps a ConfigMap's files)."""
        staged = self.path.with_suffix(".tmp")
        staged.write_text("[" + ",".join(p.model_dump_json() for p in plans) + "]")
        os.replace(staged, self.path)

    def metric(self, name: str, **labels: str) -> float | None:
        pattern = re.compile(r"^" + re.escape(name) + r"(?:\{(.*)\})? (\S+)$")
        for line in self.get("/metrics")[1].splitlines():
            match = pattern.match(line)
            if match and all(f'{key}="{value}"' in (match.group(1) or "") for key, value in labels.items()):
                return float(match.group(2))
        return None

    def reload(self, plans: list[plan.Plan], generation: int) -> None:
        """Serve `plans` (whose Plans carry `generation`): written, SIGHUP, and waited for."""
        self.write(plans)
        self.process.send_signal(signal.SIGHUP)
        wait_until(lambda: self._serves(generation), TIMEOUT, f"generation {generation} served")

    def _serves(self, generation: int) -> bool:
        assert self.process.poll() is None, f"exited with {self.process.returncode}:\n{self.text()}"
        return self.metric("layerlb_plan_generation") == generation

    def rss(self) -> int:
        """Resident memory in bytes (VmRSS)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        [kib] = re.findall(r"^VmRSS:\s+(\d+) kB$", status, flags=re.M)
        return int(kib) * 1024

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(TIMEOUT)
        self.output.close()
        assert "Traceback" not in self.text(), self.text()
        return code


# wrk's Lua hooks: every connection waits `delay` ms between its requests (a steady rate, not a flood on a
# shared machine), and `close` makes every request open a new connection (the churn meets accepts too).
_SCRIPT = """
local pause = tonumber(os.getenv("WRK_DELAY_MS") or "0")
local close = os.getenv("WRK_CLOSE") == "1"
function request()
  local headers = {}
  if close then headers["Connection"] = "close" end
  return wrk.format("GET", wrk.path, headers)
end
function delay() return pause end
"""


@dataclass
class WrkResult:
    requests: int
    errors: dict[str, int]  # connect, read, write, timeout, status (non-2xx/3xx)
    output: str

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


class Wrk:
    """wrk against `url` until `finish()`, `connections` connections pausing `delay_ms` between requests."""

    def __init__(
        self,
        tmp_path: Path,
        url: str,
        connections: int,
        delay_ms: int,
        close: bool = False,
        timeout: int = 10,
    ) -> None:
        script = tmp_path / "wrk.lua"
        script.write_text(_SCRIPT)
        env = {**os.environ, "WRK_DELAY_MS": str(delay_ms), "WRK_CLOSE": "1" if close else "0"}
        self.process = subprocess.Popen(
            ["wrk", "-t1", f"-c{connections}", "-d600s", f"--timeout={timeout}s", "-s", str(script), url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.started = time.monotonic()

    def finish(self) -> WrkResult:
        """Stop it (SIGINT: wrk prints its summary) and read what it counted."""
        self.process.send_signal(signal.SIGINT)
        output, _ = self.process.communicate(timeout=TIMEOUT)
        found = re.search(r"(\d+) requests in", output)
        assert found, output
        errors = {"status": 0}
        socket_errors = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
        )
        if socket_errors:
            errors.update(
                zip(("connect", "read", "write", "timeout"), map(int, socket_errors.groups()), strict=True)
            )
        status = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        if status:
            errors["status"] = int(status.group(1))
        return WrkResult(int(found.group(1)), errors, output)

"""Starting the things under test — nginx backends, HAProxy from layerlb's own render, and `layerlb
serve` — each ready only when it is proven to serve, so a row never measures a half-started subject.

HAProxy runs the config `layerlb render --format haproxy` prints for the bench resource, with one line
added (`nbthread 1` under `global`) so it gets one thread as layerlb gets one worker. Its per-request
log (`option httplog` to stdout, as rendered) is kept and sent to /dev/null.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bench import processes, resources
from bench.processes import Process, Unavailable
from layerlb import cli

BODY_BYTES = 21  # the response size of TESTBEDS.md's reference figures

NGINX_CONF = """# layerlb bench backend {index}: one worker, keep-alive, a {size}-byte response
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
worker_rlimit_nofile 65536;
events {{
    worker_connections 65536;
}}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000000;
    default_type text/plain;
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            return 200 "{body}\\n";
        }}
    }}
}}
"""


def nginx_body(port: int) -> str:
    """The response body without its final newline: names the backend, padded to BODY_BYTES in all."""
    return f"nginx :{port} ".ljust(BODY_BYTES - 1, "-")


def start_nginx(
    folder: Path,
    index: int,
    host: str,
    port: int,
    cpus: frozenset[int] | None,
    logs: Path,
    prefix: Sequence[str] = (),
) -> Process:
    """Start one nginx (a master and one worker) answering every request with a 21-byte body.

    `prefix` runs it elsewhere, e.g. `ip netns exec NS`; readiness is then the caller's to check.
    """
    nginx = processes.require("nginx", "nginx-light")
    home = folder / f"nginx-{index}"
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            index=index, size=BODY_BYTES, folder=home, host=host, port=port, body=nginx_body(port)
        )
    )
    argv = [*prefix, nginx, "-p", str(home), "-e", str(home / "error.log"), "-c", str(conf)]
    process = processes.start(f"nginx-{index}", argv, logs, cpus)
    if not prefix:
        try:
            processes.wait_until(
                lambda: processes.accepts(host, port), 10, f"nginx on {host}:{port}", process
            )
        except BaseException:
            process.stop()
            raise
    return process


# --- HAProxy -----------------------------------------------------------------------------------------


def render(yaml_path: Path, fmt: str) -> str:
    """`layerlb render --format FMT FILE`: the configuration layerlb itself produces for the resource.

    The CLI's own `main` runs in this process (milliseconds, where a new interpreter takes a second),
    so the reload scenario can render 30 generations without stealing CPU from the load.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["render", "--format", fmt, str(yaml_path)])
    if code != 0:
        raise Unavailable(f"layerlb render --format {fmt} failed: {err.getvalue().strip()[-300:]}")
    return out.getvalue()


def haproxy_config(yaml_path: Path, out: Path, access_log: bool = True) -> Path:
    """Render the resource for HAProxy, add `nbthread 1`, check it with `haproxy -c`, write it to `out`.

    `access_log=False` drops the render's `log` and `option httplog`/`tcplog` lines: a reference row
    showing what the per-request log costs HAProxy (the targets use the config as rendered).
    """
    haproxy = processes.require("haproxy")
    text = render(yaml_path, "haproxy")
    if not access_log:
        text = re.sub(r"(?m)^\s*(log .*|option (http|tcp)log)\n", "", text)
    text, count = re.subn(
        r"(?m)^global\n",
        "global\n    nbthread 1  # added by bench/: one thread, as layerlb has one worker\n",
        text,
    )
    if count != 1:
        raise Unavailable("the haproxy render has no `global` section to add `nbthread 1` to")
    out.write_text(text)
    check = processes.run_quiet([haproxy, "-c", "-q", "-f", str(out)])
    if check.returncode != 0:
        raise Unavailable(
            f"haproxy -c refuses the rendered config: {(check.stderr or check.stdout).strip()[-300:]}"
        )
    return out


def start_haproxy(
    config: Path, logs: Path, cpus: frozenset[int] | None, name: str = "haproxy", previous: int | None = None
) -> Process:
    """Start HAProxy on `config`; with `previous`, as HAProxy's own reload (`-sf PID`: the old one
    finishes its connections and exits). Readiness is the caller's (the port may already be open)."""
    haproxy = processes.require("haproxy")
    argv = [haproxy, "-f", str(config)]
    if previous is not None:
        argv += ["-sf", str(previous)]
    return processes.start(name, argv, logs, cpus, stdout=subprocess.DEVNULL)  # the access log


def haproxy_version() -> str:
    """`HAProxy version 2.6.x ...`, first line, for the report; empty when not installed."""
    haproxy = processes.tool("haproxy")
    if haproxy is None:
        return ""
    return processes.run_quiet([haproxy, "-v"]).stdout.splitlines()[0] if haproxy else ""


# --- layerlb serve -----------------------------------------------------------------------------------


@functools.cache
def check_serve() -> None:
    """`Unavailable` unless `layerlb serve --help` works (the command exists in this checkout)."""
    result = processes.run_quiet([*processes.layerlb_command(), "serve", "--help"])
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise Unavailable(
            f"`layerlb serve` is not available yet: {lines[-1] if lines else f'exit {result.returncode}'}"
        )


def admin_get(port: int, path: str, host: str = "127.0.0.1", timeout: float = 1.0) -> tuple[int, str]:
    """GET a path of layerlb's admin server: (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def ready(admin_port: int) -> bool:
    """Whether the admin server says the current Plan is applied (`/readyz` 200)."""
    return admin_get(admin_port, "/readyz")[0] == 200


GENERATION = re.compile(r"^layerlb_plan_generation(?:\{[^}]*\})?\s+([0-9.e+]+)\s*$", re.MULTILINE)


def served_generation(admin_port: int) -> int | None:
    """The oldest Plan generation any worker serves, from `/metrics`; None when not reported."""
    status, body = admin_get(admin_port, "/metrics")
    values = [int(float(value)) for value in GENERATION.findall(body)] if status == 200 else []
    return min(values) if values else None


def start_layerlb(
    yaml_path: Path,
    logs: Path,
    cpus: frozenset[int] | None,
    admin_port: int,
    name: str = "layerlb",
    workers: int = 1,
    prefix: Sequence[str] = (),
) -> Process:
    """Start `layerlb serve FILE --workers N --admin 127.0.0.1:PORT` pinned to the subject CPU."""
    check_serve()
    argv = [
        *prefix,
        *processes.layerlb_command(),
        "serve",
        str(yaml_path),
        "--workers",
        str(workers),
        "--admin",
        f"127.0.0.1:{admin_port}",
    ]
    return processes.start(name, argv, logs, cpus)


def wait_layerlb(process: Process, admin_port: int, vip: str, port: int, timeout: float = 20.0) -> float:
    """Poll until `/readyz` is 200 and the VIP accepts; returns the start-up time in seconds."""
    took = processes.wait_until(lambda: ready(admin_port), timeout, "layerlb serve /readyz", process)
    took += processes.wait_until(lambda: processes.accepts(vip, port), 5, f"layerlb on {vip}:{port}", process)
    return took


def smoke(host: str, port: int, what: str, path: str = "/") -> None:
    """One request through the subject must come back 200 with an nginx body, or the row is unavailable."""
    try:
        status, body = processes.http_get(host, port, path)
    except OSError as error:
        raise Unavailable(f"{what} did not answer a request on {host}:{port}: {error}") from error
    if status != 200 or len(body) != BODY_BYTES:
        raise Unavailable(
            f"{what} answered {status} with {len(body)} bytes, not 200 with nginx's {BODY_BYTES}"
        )


def write_resource(folder: Path, name: str, resource: resources.Resource) -> Path:
    """Write a resource as `<folder>/<name>.yaml` (what both subjects are given)."""
    return resources.write(folder / f"{name}.yaml", resource)

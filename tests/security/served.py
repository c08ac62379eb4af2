"""A real `layerlb serve` process serving one HTTPS LoadBalancer, for the security review's claims.

The certificate is made with the `openssl` CLI (RSA 2048, so the RSA and ECDHE-RSA suites can be tried);
the LoadBalancer and its `kubernetes.io/tls` Secret are one YAML file, as `layerlb serve` reads them
standalone; a real HTTP backend answers behind it. Rewriting the file with a new certificate is a reload
(the file is polled), so certificate rotation is tried on the same process.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0
VIP = "127.0.0.78"
SERVER_NAME = "shop.example.com"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(what: str, predicate: Any, timeout: float = TIMEOUT) -> None:
    """Poll `predicate` until it holds; fail with `what` after `timeout` seconds (a busy machine is slow)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout:.0f} s")
        time.sleep(0.05)


def make_certificate(folder: Path, tag: str) -> tuple[str, str]:
    """(certificate PEM, private key PEM): a fresh self-signed RSA pair for SERVER_NAME."""
    cert, key = folder / f"{tag}.crt", folder / f"{tag}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={SERVER_NAME}",
         "-addext", f"subjectAltName=DNS:{SERVER_NAME}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert.read_text(), key.read_text()


class Backend:
    """A real HTTP/1.1 server on 127.0.0.1 answering every GET with `ok`."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # the stdlib names it
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ServedHttps:
    """`layerlb serve` of one HTTPS listener on VIP:port, its admin server on 127.0.0.1."""

    def __init__(self, folder: Path, backend: Backend) -> None:
        self.folder = folder
        self.backend = backend
        self.port = free_port(VIP)
        self.admin_port = free_port("127.0.0.1")
        self.path = folder / "https.yaml"
        self.cert_pem, self.key_pem = make_certificate(folder, "first")
        self.write(self.cert_pem, self.key_pem)
        self.log = (folder / "serve.log").open("w")
        env = {key: value for key, value in os.environ.items() if key != "LAYERLB_DEBUG"}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "dataplane"), env.get("PYTHONPATH")])
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "layerlb.cli", "serve", str(self.path), "--poll-interval", "0.2",
             "--admin", f"127.0.0.1:{self.admin_port}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
        )  # fmt: skip
        wait_until("the HTTPS listener ready", lambda: self.admin("/readyz")[0] == 200)

    def write(self, cert_pem: str, key_pem: str) -> None:
        """The LoadBalancer and its Secret, as a user would apply them (written whole, then renamed)."""
        documents: list[dict[str, Any]] = [
            {
                "apiVersion": "layerlb.dev/v1alpha1",
                "kind": "LoadBalancer",
                "metadata": {"name": "shop-tls", "namespace": "demo"},
                "spec": {
                    "mode": "L7",
                    "architecture": "proxy",
                    "vip": VIP,
                    "listeners": [
                        {
                            "name": "https",
                            "port": self.port,
                            "protocol": "HTTPS",
                            "tls": {"secretName": "shop-tls"},
                        }
                    ],
                    "backends": [
                        {"name": "shop", "endpoints": [{"address": "127.0.0.1", "port": self.backend.port}]}
                    ],
                    "defaultBackend": "shop",
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "shop-tls", "namespace": "demo"},
                "type": "kubernetes.io/tls",
                "stringData": {"tls.crt": cert_pem, "tls.key": key_pem},
            },
        ]
        staged = self.path.with_suffix(".tmp")
        staged.write_text(yaml.safe_dump_all(documents))
        staged.replace(self.path)

    def admin(self, path: str) -> tuple[int, str]:
        """(status, body) of a GET on the admin server; (0, "") while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    def text(self) -> str:
        return (self.folder / "serve.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT)
        self.log.close()

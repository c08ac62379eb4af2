"""Client calls run inside the lab's client namespace (`Namespace.call`): module-level, picklable results.

Each returns the backends' answer lines (see `examples/backends.py`), or `ERROR <reason>` for a request
that failed, so a test counts both.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import time


def _get(connection: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> str:
    connection.request("GET", path, headers=headers)
    answer = connection.getresponse()
    body = answer.read().decode(errors="replace").strip()
    return body if answer.status == 200 else f"ERROR {answer.status} {body}"


def http_get(
    vip: str,
    port: int,
    count: int = 1,
    path: str = "/",
    headers: dict[str, str] | None = None,
    tls_name: str | None = None,
    timeout: float = 5.0,
) -> list[str]:
    """`count` GETs, each on a new connection (TLS with SNI `tls_name`, unverified, when given)."""
    lines = []
    for _ in range(count):
        connection: http.client.HTTPConnection
        if tls_name is not None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            connection = http.client.HTTPSConnection(vip, port, timeout=timeout, context=context)
            connection.sock = context.wrap_socket(
                socket.create_connection((vip, port), timeout=timeout), server_hostname=tls_name
            )
        else:
            connection = http.client.HTTPConnection(vip, port, timeout=timeout)
        try:
            lines.append(_get(connection, path, {"Host": tls_name or "example.com", **(headers or {})}))
        except (OSError, http.client.HTTPException) as error:
            lines.append(f"ERROR {type(error).__name__}: {error}")
        finally:
            connection.close()
    return lines


def http_held(vip: str, port: int, count: int, timeout: float = 5.0) -> list[str]:
    """`count` connections opened one after another and all kept open, one GET each: what a
    least-connections balancer does with connections that stay busy."""
    connections = [http.client.HTTPConnection(vip, port, timeout=timeout) for _ in range(count)]
    try:
        lines = []
        for connection in connections:
            try:
                lines.append(_get(connection, "/", {"Host": "example.com"}))
            except (OSError, http.client.HTTPException) as error:
                lines.append(f"ERROR {type(error).__name__}: {error}")
        return lines
    finally:
        for connection in connections:
            connection.close()


def udp_ask(vip: str, port: int, count: int, timeout: float = 3.0) -> list[str]:
    """`count` datagrams, each from a new socket (a new source port), one answer each."""
    lines = []
    for index in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.sendto(f"ping {index}".encode(), (vip, port))
                lines.append(sock.recv(2048).decode(errors="replace"))
            except OSError as error:
                lines.append(f"ERROR {type(error).__name__}: {error}")
    return lines


def http_until(vip: str, port: int, stop_file: str, timeout: float = 5.0) -> list[str]:
    """GETs on new connections, one after another, until `stop_file` exists (at most 5 minutes)."""
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        lines.extend(http_get(vip, port, 1, timeout=timeout))
    return lines


def reachable(vip: str, port: int, transport: str, seconds: float = 120.0) -> list[str]:
    """Until the VIP accepts a TCP connection (or answers a UDP datagram) on `port`, at most `seconds`: a
    LoadBalancer is Ready before the network delivers its VIP everywhere (kube-proxy's rules, the
    speaker's announcement). Returns `["reachable after S s"]` or `["ERROR ..."]`."""
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < seconds:
        try:
            if transport == "UDP":
                with socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(1.0)
                    s.sendto(b"ping", (vip, port))
                    s.recv(200)
            else:
                socket.create_connection((vip, port), timeout=1.0).close()
            return [f"reachable after {time.monotonic() - started:.2f} s"]
        except OSError as error:
            last = f"{type(error).__name__}: {error}"
            time.sleep(0.1)
    return [f"ERROR not reachable within {seconds:.0f} s: {last}"]


def served_certificate(vip: str, port: int, tls_name: str, timeout: float = 5.0) -> str:
    """The SHA-256 of the certificate the VIP presents for SNI `tls_name` (hex), or `ERROR <reason>`."""
    import hashlib

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((vip, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=tls_name) as wrapped,
        ):
            der = wrapped.getpeercert(binary_form=True) or b""
    except OSError as error:
        return f"ERROR {error}"
    return hashlib.sha256(der).hexdigest()

"""The LoadBalancer resources the bench feeds to both HAProxy (through `layerlb render`) and `layerlb
serve`, so the two subjects of a comparison always run the very same resource.

Each resource is a plain dict written as YAML into the run's temp folder; the reload scenario writes a
new generation of its resource for every Plan change (atomically, so a reload never reads half a file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "bench"
BENCH_CLIENTS = 1_000_000  # maxConnectionsPerClient: the bench's many connections come from one address
IDLE_SECONDS = 300  # longer than any scenario, so no idle timeout closes a connection under measurement

Resource = dict[str, Any]


def _endpoints(address: str, ports: Sequence[int]) -> list[dict[str, Any]]:
    return [{"address": address, "port": port} for port in ports]


def _resource(name: str, spec: dict[str, Any], generation: int = 1) -> Resource:
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": name, "namespace": NAMESPACE, "generation": generation},
        "spec": spec,
    }


def l7_proxy(vip: str, port: int, backend_ports: Sequence[int], name: str = "bench-l7") -> Resource:
    """An HTTP listener on the VIP, every request to one round-robin backend of nginx endpoints."""
    return _resource(
        name,
        {
            "mode": "L7",
            "architecture": "proxy",
            "vip": vip,
            # Every bench client is one address (loopback): the per-client cap must not bind.
            "listeners": [
                {"name": "http", "port": port, "protocol": "HTTP", "maxConnectionsPerClient": BENCH_CLIENTS}
            ],
            "backends": [{"name": "web", "endpoints": _endpoints("127.0.0.1", backend_ports)}],
            "defaultBackend": "web",
            "timeouts": {"idleSeconds": IDLE_SECONDS},
        },
    )


def l4_proxy(vip: str, port: int, backend_ports: Sequence[int], name: str = "bench-l4") -> Resource:
    """A userspace TCP relay on the VIP (`mode: L4, architecture: proxy`) to the same nginx endpoints."""
    return _resource(
        name,
        {
            "mode": "L4",
            "architecture": "proxy",
            "vip": vip,
            "listeners": [
                {"name": "tcp", "port": port, "protocol": "TCP", "maxConnectionsPerClient": BENCH_CLIENTS}
            ],
            "backends": [{"name": "web", "endpoints": _endpoints("127.0.0.1", backend_ports)}],
            "timeouts": {"idleSeconds": IDLE_SECONDS},
        },
    )


def kernel_nat(vip: str, port: int, backend: str, backend_port: int, name: str = "bench-kernel") -> Resource:
    """nftables DNAT (`mode: L4, architecture: nat, engine: nftables`) of the VIP to one backend."""
    return _resource(
        name,
        {
            "mode": "L4",
            "architecture": "nat",
            "engine": "nftables",
            "vip": vip,
            "listeners": [{"name": "tcp", "port": port, "protocol": "TCP"}],
            "backends": [{"name": "web", "endpoints": _endpoints(backend, [backend_port])}],
        },
    )


def reload_generation(
    generation: int, vip: str, port: int, web_ports: Sequence[int], ws_port: int, name: str = "bench-reload"
) -> Resource:
    """Generation `generation` of the reload scenario's resource; each differs from the one before.

    The `web` backend (the default, which wrk loads) rotates through the nginx ports, two or three at a
    time, so every change adds and removes endpoints; a whole `extra` backend with its route comes and
    goes; a `/genN` route changes each time. `/ws` always routes to the WebSocket echo backend, whose
    long-lived connections must survive every change.
    """
    count = len(web_ports)
    web = [web_ports[(generation + k) % count] for k in range(2 + generation % 2)]
    backends: list[dict[str, Any]] = [
        {"name": "web", "endpoints": _endpoints("127.0.0.1", web)},
        {"name": "ws", "endpoints": _endpoints("127.0.0.1", [ws_port])},
    ]
    routes: list[dict[str, Any]] = [
        {"match": {"pathPrefix": "/ws"}, "backend": "ws"},
        {"match": {"pathPrefix": f"/gen{generation}"}, "backend": "web"},
    ]
    if generation % 2:
        backends.append(
            {"name": "extra", "endpoints": _endpoints("127.0.0.1", [web_ports[generation % count]])}
        )
        routes.append({"match": {"pathPrefix": "/extra", "methods": ["GET"]}, "backend": "extra"})
    return _resource(
        name,
        {
            "mode": "L7",
            "architecture": "proxy",
            "vip": vip,
            "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}],
            "backends": backends,
            "routes": routes,
            "defaultBackend": "web",
            "timeouts": {"idleSeconds": IDLE_SECONDS},
        },
        generation=generation,
    )


def write(path: Path, resource: Resource) -> Path:
    """Write `resource` as YAML at `path` atomically (a rename), so a reload reads one whole generation."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(yaml.safe_dump(resource, sort_keys=False))
    os.replace(temporary, path)
    return path

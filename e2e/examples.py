"""The examples, moved onto a test's backends: `examples/*.yaml` as the e2e suites and benchmarks apply them.

`examples/*.yaml` point at local or documentation addresses; `adapt` keeps everything each example
declares (listeners, algorithms, routes, health checks, TLS) and changes only where it lives: its
namespace, its VIP (drawn from the test's VIPPool instead) and its endpoints' addresses (each distinct
address:port of the example becomes one of the test's backends, the port kept). Every test backend
serves every port the examples use (`HTTP_PORTS`, `UDP_PORTS`), so any endpoint mapping answers.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import yaml

EXAMPLES: Final = Path(__file__).resolve().parents[1] / "examples"
HTTP_PORTS: Final = (80, 443, 5353, 5432, 8080, 8081, 9001, 9002, 9003)
UDP_PORTS: Final = (5353, 7777, 9001, 9002, 9003)


def vip_pool(name: str, namespaces: Sequence[str], addresses: str) -> dict[str, Any]:
    """A VIPPool of `addresses` (a range or CIDR) for `namespaces`, handing them out on its own."""
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "VIPPool",
        "metadata": {"name": name},
        "spec": {"addresses": [addresses], "namespaces": list(namespaces), "autoAssign": True},
    }


def documents(file: str) -> list[dict[str, Any]]:
    """Every document of one example file."""
    return [d for d in yaml.safe_load_all((EXAMPLES / file).read_text()) if d]


def adapt(
    file: str, namespace: str, addresses: Sequence[str], name: str | None = None, **spec: Any
) -> list[dict[str, Any]]:
    """The example `file`'s documents moved into `namespace` and onto the test's backends at `addresses`."""
    moved = []
    for original in documents(file):
        document = copy.deepcopy(original)
        document["metadata"]["namespace"] = namespace
        if document["kind"] == "LoadBalancer":
            if name:
                document["metadata"]["name"] = name
            document["spec"].pop("vip", None)
            mapping: dict[tuple[str, Any], str] = {}
            lab_backends = itertools.cycle(addresses)
            for backend in document["spec"].get("backends") or []:
                for endpoint in backend.get("endpoints") or []:
                    key = (endpoint["address"], endpoint.get("port"))
                    if key not in mapping:
                        mapping[key] = next(lab_backends)
                    endpoint["address"] = mapping[key]
            document["spec"].update(spec)
        moved.append(document)
    return moved

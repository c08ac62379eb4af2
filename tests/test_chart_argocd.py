"""The Argo CD health check in docs/argocd.md, run by Debian's Lua interpreter as Argo CD would run it.

The script is read from the document's ConfigMap, so what is tested is what users paste. Argo CD hands
the script the object as the global `obj` and reads the table it returns; the harness does the same.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "argocd.md"
KEY = "resource.customizations.health.layerlb.dev_LoadBalancer"


def health_script() -> str:
    """The Lua of the health check, from the YAML block of docs/argocd.md."""
    [block] = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    config_map = yaml.safe_load(block)
    assert (config_map["kind"], config_map["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    script: str = config_map["data"][KEY]
    return script


def lua_literal(value: Any) -> str:
    """A JSON-like value as a Lua table constructor (the shape Argo CD gives `obj`)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid Lua string literal for this text
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    assert isinstance(value, dict), value
    return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"


def health(resource: dict[str, Any]) -> tuple[str, str]:
    """(status, message) the health check gives `resource`."""
    lua = shutil.which("lua5.4")
    assert lua, "lua5.4 is not installed; run scripts/system-packages.sh (make setup)"
    program = (
        f"obj = {lua_literal(resource)}\n"
        f"local function check()\n{health_script()}\nend\n"
        'local hs = check()\nio.write(hs.status, "\\n", hs.message or "", "\\n")\n'
    )
    done = subprocess.run([lua, "-"], input=program, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    status, message = done.stdout.split("\n", 1)
    return status, message.strip()


def load_balancer(generation: int, status: dict[str, Any] | None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "default", "generation": generation},
        "spec": {"mode": "L7", "architecture": "proxy"},
    }
    if status is not None:
        resource["status"] = status
    return resource


def conditions(generation: int, **statuses: tuple[str, str, str]) -> dict[str, Any]:
    return {
        "observedGeneration": generation,
        "vip": "192.0.2.10",
        "conditions": [
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
            for kind, (status, reason, message) in statuses.items()
        ],
    }


VALID = ("True", "Valid", "the spec is valid and every reference resolves")
PROGRAMMED = ("True", "Applied", "5 objects applied")


@pytest.mark.parametrize(
    ("resource", "status", "message"),
    [
        (
            load_balancer(
                3,
                conditions(
                    3,
                    Accepted=VALID,
                    Programmed=PROGRAMMED,
                    Ready=("True", "Serving", "2/2 forwarding pods serve generation 3"),
                ),
            ),
            "Healthy",
            "2/2 forwarding pods serve generation 3",
        ),
        (load_balancer(1, None), "Progressing", "Waiting for the layerlb operator"),
        (
            load_balancer(
                4, conditions(3, Accepted=VALID, Programmed=PROGRAMMED, Ready=("True", "Serving", "1/1"))
            ),
            "Progressing",
            "Waiting for the operator to observe generation 4",
        ),
        (
            load_balancer(
                2,
                conditions(
                    2,
                    Accepted=VALID,
                    Programmed=PROGRAMMED,
                    Ready=("False", "Pending", "0/2 forwarding pods serve generation 2"),
                ),
            ),
            "Progressing",
            "Ready is False (Pending): 0/2 forwarding pods serve generation 2",
        ),
        (
            load_balancer(2, conditions(2, Accepted=VALID, Programmed=PROGRAMMED)),
            "Progressing",
            "Waiting for the Ready condition of generation 2",
        ),
        (
            load_balancer(
                1,
                conditions(
                    1,
                    Accepted=(
                        "False",
                        "VIPConflict",
                        "192.0.2.10 is already the VIP of LoadBalancer shop/web",
                    ),
                    Programmed=("False", "NotAccepted", "not accepted"),
                    Ready=("False", "Pending", "0/1"),
                ),
            ),
            "Degraded",
            "Accepted is False (VIPConflict): 192.0.2.10 is already the VIP of LoadBalancer shop/web",
        ),
        (
            load_balancer(
                5,
                conditions(
                    5,
                    Accepted=VALID,
                    Programmed=("False", "ApplyFailed", "deployments.apps is forbidden"),
                    Ready=("False", "Pending", "0/1"),
                ),
            ),
            "Degraded",
            "Programmed is False (ApplyFailed): deployments.apps is forbidden",
        ),
    ],
    ids=[
        "ready",
        "no-status",
        "old-generation",
        "pods-starting",
        "no-ready-yet",
        "vip-conflict",
        "apply-failed",
    ],
)
def test_health_check(resource: dict[str, Any], status: str, message: str) -> None:
    assert health(resource) == (status, message)


def test_conditions_of_an_older_generation_do_not_count() -> None:
    """A status patched for the new generation but with a condition left from the old one."""
    status = conditions(2, Accepted=VALID, Programmed=PROGRAMMED)
    status["conditions"].append(
        {"type": "Ready", "status": "True", "reason": "Serving", "message": "1/1", "observedGeneration": 1}
    )
    assert health(load_balancer(2, status)) == (
        "Progressing",
        "Waiting for the Ready condition of generation 2",
    )

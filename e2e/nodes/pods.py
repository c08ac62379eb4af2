"""Waiting for pods on real nodes, and saying why when they do not come: a refused pod spec, a crash loop or
a missing image fails the wait at once with the pod's own events and logs, never as a bare timeout."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# Waiting reasons a kubelet gives that do not cure themselves (or only by retrying the same failure).
STUCK = {
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "RunContainerError",
}


class PodTrouble(AssertionError):
    """Pods did not become Ready; the message carries their events and logs."""


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120) -> str:
    done = subprocess.run(
        ["kubectl", *args], input=stdin, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _stuck(pod: dict[str, Any]) -> str | None:
    """Why the pod will not become Ready on its own, or None."""
    status = pod.get("status") or {}
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK:
            return f"container {container['name']}: {waiting['reason']}: {waiting.get('message', '')}".strip()
        if container.get("restartCount", 0) >= 2:
            terminated = (container.get("lastState") or {}).get("terminated") or {}
            return f"container {container['name']} restarted {container['restartCount']} times (last exit {terminated.get('exitCode')}: {terminated.get('reason')})"
    return None


def explain(env: dict[str, str], namespace: str, pods: list[dict[str, Any]]) -> str:
    """Each pod's phase, its events, and its containers' logs (the previous run's too, after a restart)."""
    parts = []
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        parts.append(
            f"--- pod {namespace}/{name} on {pod['spec'].get('nodeName')}: phase {status.get('phase')}"
        )
        events = subprocess.run(
            ["kubectl", "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        parts.append("events:\n" + (events.stdout.strip() or events.stderr.strip() or "(none)"))
        for container in pod["spec"]["containers"]:
            for previous in ("--previous", None):
                args = ["kubectl", "logs", "-n", namespace, name, "-c", container["name"], "--tail=40"]
                done = subprocess.run(
                    args + ([previous] if previous else []),
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                if done.returncode == 0 and done.stdout.strip():
                    label = "previous run" if previous else "current run"
                    parts.append(f"logs of {container['name']} ({label}):\n{done.stdout.rstrip()}")
    return "\n".join(parts)


def wait_ready(
    env: dict[str, str], namespace: str, selector: str, count: int = 1, timeout: float = 180
) -> list[dict[str, Any]]:
    """The pods matching `selector`, once at least `count` exist and all are Ready."""
    deadline = time.monotonic() + timeout
    pods: list[dict[str, Any]] = []
    while True:
        pods = json.loads(kubectl(env, "get", "pods", "-n", namespace, "-l", selector, "-o", "json"))["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if len(live) >= count and all(_ready(p) for p in live):
            return live
        troubles = [f"{p['metadata']['name']}: {why}" for p in live if (why := _stuck(p))]
        if troubles:
            raise PodTrouble(
                "pods will not become Ready: " + "; ".join(troubles) + "\n" + explain(env, namespace, live)
            )
        if time.monotonic() > deadline:
            raise PodTrouble(
                f"timed out after {timeout:.0f} s waiting for {count} Ready pod(s) {selector} in {namespace}\n"
                + explain(env, namespace, live)
            )
        time.sleep(0.2)


def wait_gone(env: dict[str, str], namespace: str, selector: str, timeout: float = 180) -> None:
    """Until no pod matches `selector`, not even a terminating one: their containers have exited."""
    deadline = time.monotonic() + timeout
    while True:
        names = kubectl(env, "get", "pods", "-n", namespace, "-l", selector, "-o", "name").split()
        if not names:
            return
        if time.monotonic() > deadline:
            raise PodTrouble(f"pods {selector} still there after {timeout:.0f} s: {names}")
        time.sleep(0.2)


def helm(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """`helm` (the local build, on the cluster environment's PATH), insisting on success."""
    done = subprocess.run(
        ["helm", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )
    if done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout

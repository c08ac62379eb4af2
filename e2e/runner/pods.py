"""What a kubelet would make of one Pod: the process to start, its environment, user, mounts and probe.

Pure functions of the Pod object (a dict as the API server returns it) so that what the operator writes
into the pod template is exactly what runs; anything this runner cannot honour is refused with a
`PodError` naming the field, rather than silently ignored. The container's "image" is this repository's
virtual environment: a command is looked up in its `bin/` first (`layerlb` is its script).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
STASH: Final = "/run/layerlb-runner"  # mount points the wrapper uses, one per emptyDir (see `wrapper`)
SYSTEM_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV_BIN: Final = Path(sys.executable).parent


class PodError(ValueError):
    """The Pod asks for something this runner cannot do; the message names the field."""


@dataclass(frozen=True)
class Probe:
    """An httpGet probe, resolved to a port number."""

    path: str
    port: int
    period: float
    timeout: float
    failures: int


@dataclass(frozen=True)
class Launch:
    """Everything needed to start the pod's (single) container."""

    argv: tuple[str, ...]
    env: dict[str, str]
    uid: int
    gid: int
    groups: tuple[int, ...]
    capabilities: tuple[str, ...]  # what the container keeps (bounding set); empty: none
    no_new_privileges: bool
    read_only_root: bool
    memory_mounts: tuple[str, ...]  # emptyDir volumes: a tmpfs each
    sysctls: tuple[tuple[str, str], ...]
    host_network: bool
    readiness: Probe | None
    liveness: Probe | None
    service_account: str
    automount_token: bool


def _get(document: Mapping[str, Any], *path: str) -> Any:
    found: Any = document
    for key in path:
        if not isinstance(found, Mapping):
            return None
        found = found.get(key)
    return found


def _field(pod: Mapping[str, Any], path: str, host_ip: str, pod_ip: str) -> str:
    """The value of a downward-API fieldRef."""
    simple = {
        "metadata.name": _get(pod, "metadata", "name"),
        "metadata.namespace": _get(pod, "metadata", "namespace"),
        "metadata.uid": _get(pod, "metadata", "uid"),
        "spec.nodeName": _get(pod, "spec", "nodeName") or "",
        "spec.serviceAccountName": _get(pod, "spec", "serviceAccountName") or "default",
        "status.hostIP": host_ip,
        "status.podIP": pod_ip,
    }
    if path in simple:
        return str(simple[path])
    for prefix, key in (("metadata.labels['", "labels"), ("metadata.annotations['", "annotations")):
        if path.startswith(prefix) and path.endswith("']"):
            return str((_get(pod, "metadata", key) or {}).get(path[len(prefix) : -2], ""))
    raise PodError(f"env fieldRef.fieldPath {path!r} is not supported by the pod runner")


def _probe(container: Mapping[str, Any], kind: str) -> Probe | None:
    probe = container.get(kind)
    if not probe:
        return None
    http = probe.get("httpGet")
    if not http:
        raise PodError(f"containers[0].{kind}: only httpGet probes are supported by the pod runner")
    port = http.get("port")
    if isinstance(port, str):
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        if port not in named:
            raise PodError(f"containers[0].{kind}.httpGet.port: no container port named {port!r}")
        port = named[port]
    return Probe(
        path=str(http.get("path") or "/"),
        port=int(port),
        period=float(probe.get("periodSeconds") or 10),
        timeout=float(probe.get("timeoutSeconds") or 1),
        failures=int(probe.get("failureThreshold") or 3),
    )


def command_path(name: str) -> str:
    """A container command resolved like an image's PATH: the venv's `bin/` first, then the system's."""
    if "/" in name:
        return name
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{SYSTEM_PATH}")
    if found is None:
        raise PodError(f"containers[0].command: {name!r} is neither in {VENV_BIN} nor on the system PATH")
    return found


def launch(pod: Mapping[str, Any], *, host_ip: str, pod_ip: str, api_host: str, api_port: int) -> Launch:
    """The Launch of `pod` once placed at `pod_ip` on node `host_ip` (equal for host-network pods)."""
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if len(containers) != 1 or spec.get("initContainers"):
        raise PodError("spec.containers: the pod runner starts exactly one container and no init containers")
    container = containers[0]
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise PodError("containers[0].command: empty (the runner's image has no entrypoint)")
    argv[0] = command_path(argv[0])

    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}{SYSTEM_PATH}",
        "HOME": "/tmp",
        "HOSTNAME": str(_get(pod, "metadata", "name")),
        "KUBERNETES_SERVICE_HOST": api_host,
        "KUBERNETES_SERVICE_PORT": str(api_port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(api_port),
        "KUBERNETES_PORT": f"tcp://{api_host}:{api_port}",
    }
    # The "image" is this checkout: its sources, as the runner itself imports them.
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    for index, item in enumerate(container.get("env") or []):
        name = item["name"]
        if "value" in item:
            env[name] = str(item["value"])
        elif _get(item, "valueFrom", "fieldRef", "fieldPath"):
            env[name] = _field(pod, item["valueFrom"]["fieldRef"]["fieldPath"], host_ip, pod_ip)
        else:
            raise PodError(f"containers[0].env[{index}] ({name}): only value and fieldRef are supported")

    pod_security = spec.get("securityContext") or {}
    security = container.get("securityContext") or {}
    uid = security.get("runAsUser", pod_security.get("runAsUser", 0))
    gid = security.get("runAsGroup", pod_security.get("runAsGroup", uid))
    if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) and uid == 0:
        raise PodError("securityContext.runAsNonRoot is true but the container would run as root")
    groups = (pod_security["fsGroup"],) if "fsGroup" in pod_security else ()
    # Root keeps what the container adds after `drop: [ALL]` (or everything without that drop);
    # any other user has no capabilities at all (no file capabilities in this "image").
    capabilities = security.get("capabilities") or {}
    added = tuple(c.upper() for c in capabilities.get("add") or [])
    dropped_all = "ALL" in [c.upper() for c in capabilities.get("drop") or []]
    kept = (added if dropped_all else ("ALL",)) if uid == 0 else ()

    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    memory_mounts = []
    token = False
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"]) or {}
        if mount.get("mountPath") == SERVICE_ACCOUNT_DIR and "projected" in volume:
            token = True  # kube-api-access-*: what the ServiceAccount admission plugin adds
            continue
        if "emptyDir" not in volume:
            raise PodError(f"containers[0].volumeMounts {mount['name']}: only emptyDir volumes are supported")
        memory_mounts.append(str(mount["mountPath"]))

    return Launch(
        argv=tuple(argv),
        env=env,
        uid=int(uid),
        gid=int(gid),
        groups=tuple(int(g) for g in groups),
        capabilities=kept,
        no_new_privileges=security.get("allowPrivilegeEscalation") is False,
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        memory_mounts=tuple(memory_mounts),
        sysctls=tuple((str(s["name"]), str(s["value"])) for s in pod_security.get("sysctls") or []),
        host_network=bool(spec.get("hostNetwork")),
        readiness=_probe(container, "readinessProbe"),
        liveness=_probe(container, "livenessProbe"),
        service_account=str(spec.get("serviceAccountName") or "default"),
        automount_token=token,
    )


def image_paths() -> list[str]:
    """The folders the container's "image" consists of: the interpreter, the venv, the sources."""
    found = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    found.update(entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry)
    found.add(str(Path(__file__).resolve().parents[2]))
    return sorted({os.path.realpath(path) for path in found if os.path.isdir(path)})


def wrapper(launch: Launch, token_dir: Path | None) -> list[str]:
    """The argv that starts `launch` inside a private mount namespace (to be run under `ip netns exec`).

    In that mount namespace: the root file system read-only if asked, a tmpfs per emptyDir, the token
    folder bind-mounted where in-cluster clients look; then `setpriv` becomes the pod's user with only
    the capabilities the container keeps, and execs the command (same pid: signals reach it).
    """
    steps = ["set -e"]
    if token_dir is not None:  # first: the folder may be under a path an emptyDir covers next (/tmp)
        steps.append(f"mount --bind -o ro {shlex.quote(str(token_dir))} {SERVICE_ACCOUNT_DIR}")
    if launch.read_only_root:
        steps.append("mount -o remount,bind,ro /")
    for index, path in enumerate(launch.memory_mounts):
        # The "image" (venv, sources) may live under the emptyDir's path (a checkout in /tmp): keep
        # those folders visible through a stash mount of the original, as an image's own files would be.
        covered = [p for p in image_paths() if os.path.commonpath([p, path]) == path and p != path]
        stash = f"{STASH}/{index}"
        if covered:
            # --rbind: what is mounted below the path comes along (in the QEMU guest a checkout under /tmp is
            # itself a bind mount over the guest's tmpfs; a plain bind would stash an empty folder).
            steps.append(f"mount --rbind {shlex.quote(path)} {stash}")
        steps.append(f"mount -t tmpfs -o size=16m,mode=1777 tmpfs {shlex.quote(path)}")
        for folder in covered:
            inside = shlex.quote(os.path.join(path, os.path.relpath(folder, path)))
            original = shlex.quote(os.path.join(stash, os.path.relpath(folder, path)))
            steps.append(f"mkdir -p {inside} && mount --rbind {original} {inside}")
    privileges = ["setpriv", f"--reuid={launch.uid}", f"--regid={launch.gid}"]
    privileges.append(f"--groups={','.join(map(str, launch.groups))}" if launch.groups else "--clear-groups")
    if "ALL" not in launch.capabilities:
        kept = "".join(f",+{c.lower()}" for c in launch.capabilities)
        privileges += [f"--bounding-set=-all{kept}", f"--inh-caps=-all{kept}"]
    if launch.no_new_privileges:
        privileges.append("--no-new-privs")
    steps.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(steps), "pod",
            *privileges, "--", *launch.argv]  # fmt: skip

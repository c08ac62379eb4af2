"""The operator starts the way the chart runs it on a kubelet: uid 65532 with no passwd entry, no USER,
LOGNAME or HOME, no capabilities, a read-only root file system with `/tmp` an emptyDir, the in-cluster
ServiceAccount files.

kopf names itself, when not told, with `getpass.getuser()` (`detect_own_id` in
kopf/_core/engines/peering.py, called by `spawn_tasks` in kopf/_core/reactor/running.py whenever
`kopf.operator` gets no `identity`). With no passwd entry that raises KeyError (OSError from Python 3.13),
and the operator stopped at once: "the operator stopped unexpectedly: 'getpwuid(): uid not found: 65532'".
`main.identity` (the pod's name from POD_NAME, else the hostname) is handed to kopf instead.
"""

from __future__ import annotations

import getpass
import os
import pwd
import re
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import certifi
import pytest
from layerlb_operator import main, objects

ROOT = Path(__file__).resolve().parents[2]
UID = objects.NONROOT_UID  # the chart's podSecurityContext and the Dockerfile's USER
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"  # where the kubernetes client looks
POD_NAME = "layerlb-operator-7d9f8c6b5-x2x9q"


def _refuse() -> str:
    raise KeyError(f"getpwuid(): uid not found: {UID}")


def test_identity_is_the_pod_name_and_a_per_process_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", _refuse)
    first, second = main.identity({"POD_NAME": POD_NAME}), main.identity({"POD_NAME": POD_NAME})
    assert re.fullmatch(rf"{POD_NAME}-{os.getpid()}-[0-9a-f]{{6}}", first), first
    assert first != second  # a restarted container is never taken for the holder it replaces


def test_identity_without_pod_name_is_the_hostname_never_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", _refuse)
    monkeypatch.setattr(socket, "gethostname", lambda: "devbox")
    assert re.fullmatch(rf"devbox-{os.getpid()}-[0-9a-f]{{6}}", main.identity({}))


# The "image": this interpreter's packages and the sources, readable by any user.
# The source roots pyproject.toml names (".", operator/, dataplane/, speaker/, ...), as the editable install has them.
SOURCE_ROOTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
    "where"
]
PYTHONPATH = [*site.getsitepackages(), *(str((ROOT / root).resolve()) for root in SOURCE_ROOTS)]


def _as_pod_user(argv: Sequence[str], env: dict[str, str]) -> list[str]:
    """argv run as UID with only `env`: no supplementary groups, capabilities or privilege escalation."""
    user = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]
    user += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    return [*user, "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]


def _interpreter() -> str:
    """An interpreter of this Python version that UID can run with PYTHONPATH (a venv's base interpreter
    may sit in a folder only root can enter, e.g. pyenv's under /root: then the system's)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable)]
    candidates += [found for d in ("/usr/local/bin", "/usr/bin") if (found := shutil.which(version, path=d))]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(PYTHONPATH)}
    for candidate in dict.fromkeys(candidates):
        probe = [candidate, "-c", "import kopf, layerlb_operator.main"]
        if subprocess.run(_as_pod_user(probe, env), capture_output=True, timeout=60).returncode == 0:
            return candidate
    pytest.skip(f"no {version} that uid {UID} can run with {PYTHONPATH} (tried {candidates})")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _requirements() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a private mount namespace and setpriv to another uid")
    for tool in ("unshare", "setpriv", "mount"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not found (util-linux)")
    try:
        pwd.getpwuid(UID)
    except KeyError:
        pass
    else:
        pytest.skip(f"uid {UID} has a passwd entry on this machine; the chart's image has none")


@pytest.mark.parametrize("pod_name", [POD_NAME, None], ids=["POD_NAME", "no-POD_NAME"])
def test_the_operator_starts_as_a_uid_without_passwd_entry_on_a_read_only_root(
    pod_name: str | None, tmp_path: Path
) -> None:
    _requirements()
    python = _interpreter()
    run_dir = os.path.realpath("/var/run")
    covered = [p for p in [python, *PYTHONPATH] if p.startswith(f"{run_dir}/")]
    if covered:
        pytest.skip(f"{covered} would be hidden by the pod's {run_dir} mount")
    # The chart's emptyDir at /tmp: a fresh tmpfs, unless the checkout itself lives under /tmp (a CI
    # clone), which a tmpfs would hide; then /tmp stays as it is, made a mount of its own so that it
    # stays writable when the root goes read-only.
    under_tmp = any(p.startswith("/tmp/") for p in [python, *PYTHONPATH])
    tmp_mount = "mount --bind /tmp /tmp" if under_tmp else "mount -t tmpfs -o size=16m,mode=1777 tmpfs /tmp"
    sa_dir = os.path.join(run_dir, os.path.relpath(SERVICE_ACCOUNT, "/var/run"))
    given = tmp_path / "serviceaccount"  # what the kubelet projects: token, CA bundle, namespace
    given.mkdir()
    (given / "token").write_text("not-a-real-token")
    shutil.copyfile(certifi.where(), given / "ca.crt")
    (given / "namespace").write_text("layerlb-system")
    # As root in a private mount namespace, then the pod's user: the kubelet's view of the container.
    script = "\n".join(
        [
            "set -e",
            f"mount -t tmpfs -o size=1m,mode=755 tmpfs {shlex.quote(run_dir)}",
            f"mkdir -p {shlex.quote(sa_dir)}",
            f"cp {shlex.quote(str(given))}/* {shlex.quote(sa_dir)}/ && chmod 644 {shlex.quote(sa_dir)}/*",
            tmp_mount,  # the chart's emptyDir
            "mount -o remount,bind,ro /",  # readOnlyRootFilesystem
            'exec "$@"',
        ]
    )
    api_port = _free_port()  # nothing listens: kopf keeps retrying, which is enough to show it started
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join(PYTHONPATH),
        "POD_NAMESPACE": "layerlb-system",
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api_port),
    }  # no USER, LOGNAME, HOME, KUBECONFIG
    if pod_name:
        env["POD_NAME"] = pod_name
    command = [python, "-c", "import sys; from layerlb.cli import main; sys.exit(main())"]
    command += ["operator", "--standalone", "--metrics", "127.0.0.1:0"]
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "pod"]
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*argv, *_as_pod_user(command, env)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        text = ""
        # kopf asking the API server for its resources: past `spawn_tasks` (the identity) and the login.
        while f"127.0.0.1:{api_port}/api" not in text:
            text = log_path.read_text(errors="replace")
            assert process.poll() is None, f"the operator exited with {process.returncode}:\n{text}"
            assert time.monotonic() < deadline, f"kopf never reached the API server:\n{text}"
            time.sleep(0.2)
        metrics = re.search(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", text)
        assert metrics, text
        with urllib.request.urlopen(f"{metrics[1]}/healthz", timeout=10) as answer:
            assert answer.status == 200
        assert process.poll() is None, log_path.read_text(errors="replace")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text and "getpwuid" not in text and "stopped unexpectedly" not in text, text

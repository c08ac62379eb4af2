"""The images of `e2e/images/build.py` load into a real containerd and run: layerlb as uid 65532 with its
templates, busybox's httpd in the backend image, pause. A throwaway containerd (its own root, state and
socket in a temporary folder, the CRI plugin off) is started for the module and removed afterwards with
everything it mounted and started. Needs root and the tools below: without them the tests fail."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.images import build, layerlb_image, oci

TOOLS = (
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "umoci",
    "skopeo",
    "debootstrap",
    "gcc",
    "unshare",
)
CTR_TIMEOUT = 180.0
# Containers go into cgroups under this parent (one per test run), removed at the end.
CGROUP_PARENT = f"layerlb-images-test-{os.getpid()}"

Ctr = Callable[..., str]


def _require_tools() -> None:
    problems = [] if os.geteuid() == 0 else ["root (chroot, mounts, containerd)"]
    problems += [tool for tool in TOOLS if shutil.which(tool) is None]
    if problems:
        pytest.fail(f"building and running the e2e images needs: {', '.join(problems)}", pytrace=False)


@pytest.fixture(scope="module")
def archives() -> dict[str, build.ImageArchive]:
    _require_tools()
    return build.build_all()


def _mounts_under(folder: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((p for p in points if p == str(folder) or p.startswith(f"{folder}/")), reverse=True)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
    return pids


def _cgroup_dirs() -> list[Path]:
    return sorted(Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"))


def _stop_everything(folder: Path, containerd: subprocess.Popen[bytes], address: str) -> None:
    """Kill what is left in our cgroups, containerd, its shims; unmount and remove ``folder``."""
    for group in _cgroup_dirs():
        for procs in group.glob("*/cgroup.procs"):
            for task in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(task), signal.SIGKILL)
    containerd.terminate()
    try:
        containerd.wait(timeout=30)
    except subprocess.TimeoutExpired:
        containerd.kill()
        containerd.wait(timeout=30)
    for shim in _pids_mentioning(f"-address {address}"):  # shims of our containerd
        with contextlib.suppress(ProcessLookupError):
            os.kill(shim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _pids_mentioning(f"-address {address}") and time.monotonic() < deadline:
        time.sleep(0.1)
    for point in _mounts_under(folder):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(folder, ignore_errors=True)
    for group in _cgroup_dirs():
        for child in sorted(group.iterdir(), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            group.rmdir()


@pytest.fixture(scope="module")
def ctr(archives: dict[str, build.ImageArchive]) -> Iterator[Ctr]:
    """``ctr`` against a throwaway containerd that has imported every archive."""
    folder = Path(tempfile.mkdtemp(prefix="llb-ctrd-"))
    address = str(folder / "c.sock")
    config = folder / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{folder}/root"\nstate = "{folder}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{folder}/opt"\n'
    )
    log = open(folder / "containerd.log", "wb")  # noqa: SIM115 (closed in the finally below)
    containerd = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )

    def run(*args: str, timeout: float = CTR_TIMEOUT) -> str:
        done = subprocess.run(
            ["ctr", "--address", address, "--namespace", "k8s.io", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"ctr {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    try:
        deadline = time.monotonic() + 60
        while True:
            if containerd.poll() is not None:
                pytest.fail(
                    f"containerd exited {containerd.returncode}: {(folder / 'containerd.log').read_text()}"
                )
            if Path(address).exists() and subprocess.run(
                ["ctr", "--address", address, "version"], capture_output=True, timeout=30, check=False
            ).returncode == 0:  # fmt: skip
                break
            if time.monotonic() > deadline:
                pytest.fail(f"containerd did not answer on {address} in 60 s")
            time.sleep(0.1)
        for archive in archives.values():
            run("images", "import", str(archive.path), timeout=600)
        yield run
    finally:
        _stop_everything(folder, containerd, address)
        log.close()


_serial = iter(range(1_000_000))


def _container(ctr: Ctr, image: str, *args: str, options: tuple[str, ...] = ()) -> str:
    name = f"t{os.getpid()}-{next(_serial)}"
    return ctr("run", "--rm", f"--cgroup=/{CGROUP_PARENT}/{name}", *options, image, name, *args)


def test_every_image_is_imported_under_its_reference(
    ctr: Ctr, archives: dict[str, build.ImageArchive]
) -> None:
    listed = ctr("images", "list", "--quiet").split()
    assert {a.reference for a in archives.values()} <= set(listed), listed


def test_layerlb_runs_its_help_by_default_as_uid_65532_from_the_venv(ctr: Ctr) -> None:
    assert "render" in _container(ctr, "localhost/layerlb:dev")  # ENTRYPOINT layerlb, CMD --help
    probe = "import os, sys; print(os.getuid(), os.getgid(), os.getcwd(), sys.prefix, os.environ['PYTHONUNBUFFERED'])"
    assert _container(ctr, "localhost/layerlb:dev", "python3", "-c", probe).split() == [
        "65532", "65532", "/", "/opt/layerlb", "1",
    ]  # fmt: skip
    tools = _container(
        ctr, "localhost/layerlb:dev", "sh", "-c", "for t in ip nft ipvsadm; do command -v $t; done"
    )
    assert len(tools.split()) == 3, tools


def test_layerlb_validates_and_renders_the_examples_with_its_packaged_templates(ctr: Ctr) -> None:
    examples = build.REPO_ROOT / "examples"
    mount = (f"--mount=type=bind,src={examples},dst=/examples,options=rbind:ro",)
    files = ["/examples/l7-proxy-routes.yaml", "/examples/l4-proxy-tcp.yaml"]
    assert (
        _container(ctr, "localhost/layerlb:dev", "layerlb", "validate", *files, options=mount).count(": ok")
        == 2
    )
    haproxy = _container(
        ctr, "localhost/layerlb:dev", "layerlb", "render", "--format", "haproxy", files[0], options=mount
    )
    assert "haproxy.cfg" in haproxy and "backend" in haproxy


def test_backend_serves_http_with_busybox_and_runs_as_any_uid(ctr: Ctr) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = (
        f"mkdir /tmp/www && echo served > /tmp/www/index.html && httpd -p 127.0.0.1:{port} -h /tmp/www"
        f" && wget -q -O - http://127.0.0.1:{port}/"
        " && su -s /bin/sh -c 'id -u; echo written > /tmp/nobody; cat /tmp/nobody' nobody"
    )
    out = _container(ctr, "localhost/backend:dev", "sh", "-c", script, options=("--net-host",))
    assert out.split() == ["served", "65534", "written"], out


def test_pause_is_static_and_reports_its_version(ctr: Ctr) -> None:
    assert _container(ctr, "localhost/pause:3.10", "/pause", "-v").startswith("pause.c v3.")


def test_a_second_build_with_nothing_changed_rebuilds_nothing(
    archives: dict[str, build.ImageArchive],
) -> None:
    before = {name: a.path.stat().st_mtime_ns for name, a in archives.items()}
    start = time.monotonic()
    again = build.build_all()
    assert time.monotonic() - start < 10
    assert again == archives
    assert {name: a.path.stat().st_mtime_ns for name, a in again.items()} == before


def test_the_dockerfile_runs_the_same_recipe_and_says_what_build_py_reads() -> None:
    text = layerlb_image.DOCKERFILE.read_text()
    assert f"FROM debian:{layerlb_image.SUITE}-slim" in text
    assert "sh /tmp/layerlb-rootfs.sh system" in text and "sh /src/images/layerlb-rootfs.sh venv /src" in text
    config = layerlb_image.dockerfile_config()
    assert (config.user, config.workdir, config.entrypoint, config.cmd) == (
        "65532:65532",
        "/",
        ("layerlb",),
        ("--help",),
    )
    assert config.env[0].startswith("PATH=/opt/layerlb/bin:")
    assert {"PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"} <= set(config.env)
    assert subprocess.run(["sh", "-n", str(layerlb_image.RECIPE)], check=False).returncode == 0
    assert {"python3-venv", "iproute2", "nftables", "ipvsadm"} <= set(layerlb_image.packages())


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("ENV PATH=/opt/layerlb/bin:$PATH", "uses a variable"),
        ("ENV PYTHONUNBUFFERED 1", "KEY=VALUE"),
        ("ENTRYPOINT layerlb", "exec form"),
    ],
)
def test_a_dockerfile_build_py_cannot_read_is_refused_with_the_reason(
    tmp_path: Path, line: str, complaint: str
) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM debian:bookworm-slim\n{line}\n")
    with pytest.raises(oci.BuildError, match=complaint):
        layerlb_image.dockerfile_config(dockerfile)

"""Container images for the e2e nodes, built without Docker or a registry into docker-archive tarballs.

    python -m e2e.images.build [--out DIR] [--only NAME...]

``build_all()`` returns ``{name: ImageArchive}``; ``ctr -n k8s.io images import ARCHIVE.tar`` loads each:

- ``pause``   localhost/pause:3.10   ``gcc -static`` of build/pause/linux/pause.c from the k8s.io/kubernetes
  module (the version e2e/cluster/build.sh builds); entrypoint /pause, user 65535 as upstream.
- ``layerlb`` localhost/layerlb:dev  what the Dockerfile builds, from the same recipe (`layerlb_image.py`).
- ``backend`` localhost/backend:dev  busybox-static with every applet linked; CMD ["sh"], runs as any uid.

The output folder (default ``$LAYERLB_CACHE/images``, else ``<repo>/.cache/images``) holds each
``NAME.tar`` and, beside it, ``NAME.json`` with the digest of its inputs: an image is rebuilt only when
that digest changes (a tarball without its stamp is not taken as done). ``stages/`` keeps the slow parts
of the layerlb image, ``debs/`` debootstrap's downloads. Everything is made under ``tmp/`` and renamed
into place, so deleting the folder at any time is safe; one build at a time holds ``.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from e2e.cluster.cluster import cache_root
from e2e.images import layerlb_image, oci
from e2e.images.oci import PATH_ENV, BuildError, ImageConfig, digest, log, run, timed

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_BUILD_SCRIPT = REPO_ROOT / "e2e" / "cluster" / "build.sh"
BUSYBOX = Path("/bin/busybox")
# The image's code: a change to any of these rebuilds every image.
BUILDER_FILES = (Path(__file__), Path(oci.__file__), Path(layerlb_image.__file__))


@dataclass(frozen=True)
class ImageArchive:
    """A docker-archive tarball holding one image under ``reference``."""

    name: str  # "layerlb"
    reference: str  # "localhost/layerlb:dev"
    path: Path
    inputs: str  # digest of everything the image is built from


@dataclass(frozen=True)
class _Recipe:
    name: str
    reference: str
    inputs: Callable[[], str]
    build: Callable[[Path, Path], None]  # (work, out): fills the OCI layout work/oci, tag "image"


def default_out_dir() -> Path:
    return cache_root() / "images"


# --------------------------------------------------------------------------------------------- pause


def _k8s_version() -> str:
    """The k8s.io/kubernetes version e2e/cluster/build.sh builds (LAYERLB_K8S_VERSION if it names one)."""
    env = os.environ.get("LAYERLB_K8S_VERSION", "")
    if re.fullmatch(r"v1\.\d+\.\d+", env):
        return env
    found = re.search(r'K8S_VERSION="\$\{LAYERLB_K8S_VERSION:-(v[0-9.]+)\}"', K8S_BUILD_SCRIPT.read_text())
    if not found:
        raise BuildError(f"no K8S_VERSION default found in {K8S_BUILD_SCRIPT}")
    return found.group(1)


def _kubernetes_module(version: str, work: Path) -> Path:
    """The module in build.sh's Go module cache, downloaded there when missing."""
    cache = cache_root() / "go"
    module = cache / "mod" / f"k8s.io/kubernetes@{version}"
    if (module / "build" / "pause" / "linux" / "pause.c").is_file():
        return module
    go = os.environ.get("GO") or shutil.which("go") or "/usr/local/go/bin/go"
    env = {
        **os.environ,
        "GOPATH": str(cache / "path"), "GOMODCACHE": str(cache / "mod"), "GOCACHE": str(cache / "build"),
        "GOTOOLCHAIN": "local", "GOFLAGS": "-modcacherw", "GOWORK": "off", "GO111MODULE": "on",
    }  # fmt: skip
    tmp = work / "gomod"
    tmp.mkdir()
    with timed(f"pause: downloading the k8s.io/kubernetes@{version} module (large; once)"):
        run([go, "mod", "init", "layerlb.local/pausesource"], cwd=tmp, env=env)
        run([go, "mod", "download", "-json", f"k8s.io/kubernetes@{version}"], cwd=tmp, env=env)
    return module


def _pause_inputs() -> str:
    return digest(_k8s_version(), run(["gcc", "-dumpfullversion"]))


def _pause_build(work: Path, out: Path) -> None:
    module = _kubernetes_module(_k8s_version(), work)
    tag = re.search(r"^TAG \?= (\S+)", (module / "build" / "pause" / "Makefile").read_text(), re.M)
    layout, bundle = work / "oci", work / "bundle"
    oci.new_image(layout, "image", bundle)
    # The flags of build/pause/Makefile (its `strip` as -s).
    run(["gcc", "-Os", "-Wall", "-Werror", "-static", "-s", f"-DVERSION=v{tag.group(1) if tag else 'HEAD'}",
         "-o", bundle / "rootfs" / "pause", module / "build" / "pause" / "linux" / "pause.c"])  # fmt: skip
    run(oci.repack_command(layout, "image", bundle, "gcc -static build/pause/linux/pause.c"))
    ImageConfig(entrypoint=("/pause",), user="65535:65535").apply(layout, "image")


# ------------------------------------------------------------------------------------------- backend


def _busybox_version() -> str:
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "busybox-static"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    if not status.stdout.startswith("install ok installed") or not BUSYBOX.is_file():
        raise BuildError("the backend image needs busybox-static: apt-get install busybox-static")
    return status.stdout.split()[-1]


def _backend_inputs() -> str:
    return digest(_busybox_version(), BUSYBOX.read_bytes())


def _backend_build(work: Path, out: Path) -> None:
    layout, bundle = work / "oci", work / "bundle"
    oci.new_image(layout, "image", bundle)
    rootfs = bundle / "rootfs"
    for folder, mode in (("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755),
                         ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777), ("var/www", 0o755)):  # fmt: skip
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
        (rootfs / folder).chmod(mode)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "busybox").chmod(0o755)
    for applet in run([BUSYBOX, "--list-full"]).split():  # bin/sh, usr/bin/wget, sbin/ip, ...
        link = rootfs / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    # Names for root and for the uid/gid 65534 pods may run as (`su nobody`, `ls -l`, httpd's -u).
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    run(oci.repack_command(layout, "image", bundle, "busybox-static"))
    ImageConfig(env=(PATH_ENV,), workdir="/", cmd=("sh",)).apply(layout, "image")


# ----------------------------------------------------------------------------------------- build_all

RECIPES = (
    _Recipe("pause", "localhost/pause:3.10", _pause_inputs, _pause_build),
    _Recipe("layerlb", "localhost/layerlb:dev", layerlb_image.inputs, layerlb_image.build),
    _Recipe("backend", "localhost/backend:dev", _backend_inputs, _backend_build),
)
NAMES = tuple(r.name for r in RECIPES)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build in {out}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ensure(recipe: _Recipe, out: Path, builder: str) -> ImageArchive:
    archive, stamp = out / f"{recipe.name}.tar", out / f"{recipe.name}.json"
    inputs = digest(builder, recipe.inputs())
    result = ImageArchive(recipe.name, recipe.reference, archive, inputs)
    with contextlib.suppress(OSError, ValueError, KeyError):
        if archive.is_file() and json.loads(stamp.read_text())["inputs"] == inputs:
            log(f"{recipe.reference}: up to date ({archive.stat().st_size / 2**20:.1f} MiB, {archive})")
            return result
    stamp.unlink(missing_ok=True)
    start = time.monotonic()
    log(f"{recipe.reference}: building")
    work = out / "tmp" / recipe.name
    work.mkdir(parents=True)
    recipe.build(work, out)
    oci.export(work / "oci", "image", recipe.reference, archive, work)
    seconds = time.monotonic() - start
    record = {"reference": recipe.reference, "inputs": inputs, "seconds": round(seconds, 1)}
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, stamp)
    shutil.rmtree(work)
    log(f"{recipe.reference}: built in {seconds:.1f} s ({archive.stat().st_size / 2**20:.1f} MiB, {archive})")
    return result


def build_all(out_dir: Path | None = None, only: Iterable[str] | None = None) -> dict[str, ImageArchive]:
    """Build what is missing or out of date; return every image (or those named in ``only``) by name."""
    names = list(only or NAMES)
    if unknown := sorted(set(names) - set(NAMES)):
        raise BuildError(f"unknown image(s) {unknown}; known: {list(NAMES)}")
    out = (out_dir or default_out_dir()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with _locked(out):
        shutil.rmtree(out / "tmp", ignore_errors=True)  # what a killed build left (we hold the lock)
        (out / "stages").mkdir(exist_ok=True)
        builder = digest(*(path.read_bytes() for path in BUILDER_FILES))
        archives = {r.name: _ensure(r, out, builder) for r in RECIPES if r.name in names}
        shutil.rmtree(out / "tmp", ignore_errors=True)
    log(f"done in {time.monotonic() - start:.1f} s")
    return archives


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.images.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help=f"output folder (default {default_out_dir()})")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"any of {', '.join(NAMES)}")
    args = parser.parse_args(argv)
    try:
        archives = build_all(args.out, args.only)
    except BuildError as error:
        log(f"ERROR: {error}")
        return 1
    for archive in archives.values():
        print(f"{archive.reference}\t{archive.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The image tools of `build.py`: OCI layouts with umoci, docker-archive export with skopeo, and chroot
steps on overlays in private mount namespaces.

Layers come from ``umoci unpack`` → change the rootfs → ``umoci repack``, never ``umoci insert``: the
insert of umoci 0.4.7 (Debian bookworm's) writes layers without the tar footer, which GNU tar and
Python's tarfile refuse (fixed upstream in umoci PR #534).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BuildError(RuntimeError):
    """An image could not be built; the message names the step and shows its output."""


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    log(f"{what} ...")
    start = time.monotonic()
    yield
    log(f"{what}: {time.monotonic() - start:.1f} s")


def run(
    cmd: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
) -> str:
    """Run a command, return its stdout; on failure raise BuildError with the end of its output."""
    args = [str(a) for a in cmd]
    try:
        done = subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as expired:
        raise BuildError(f"`{shlex.join(args)[:300]}` still ran after {timeout:.0f} s") from expired
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        raise BuildError(f"`{shlex.join(args)[:300]}` exited {done.returncode}:\n{tail}")
    return done.stdout


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class ImageConfig:
    """The image configuration fields the builders set."""

    env: tuple[str, ...] = ()
    user: str | None = None
    workdir: str | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None

    def apply(self, oci: Path, tag: str) -> None:
        args = [f"--config.env={e}" for e in self.env]
        if self.user is not None:
            args.append(f"--config.user={self.user}")
        if self.workdir is not None:
            args.append(f"--config.workingdir={self.workdir}")
        args += [f"--config.entrypoint={a}" for a in self.entrypoint or ()]
        args += [f"--config.cmd={a}" for a in self.cmd or ()]
        run(["umoci", "config", "--image", f"{oci}:{tag}", *args])


def new_image(oci: Path, tag: str, bundle: Path) -> None:
    """An empty image ``oci:tag`` and its (empty) bundle to fill and repack."""
    run(["umoci", "init", "--layout", oci])
    run(["umoci", "new", "--image", f"{oci}:{tag}"])
    run(["umoci", "unpack", "--image", f"{oci}:{tag}", bundle])


def repack_command(oci: Path, tag: str, bundle: Path, created_by: str) -> list[str]:
    """A layer of what changed in the bundle's rootfs, as ``oci:tag``; the bundle then describes it."""
    return ["umoci", "repack", "--refresh-bundle", f"--history.created_by={created_by}",
            "--image", f"{oci}:{tag}", str(bundle)]  # fmt: skip


def link_layout(src: Path, dst: Path) -> None:
    """Copy an OCI layout, blobs as hard links: they are content-addressed and never rewritten."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.relative_to(src).parts[0] == "blobs":
            os.link(path, target)
        else:
            shutil.copy2(path, target)


def bundle_from(meta: Path, bundle: Path) -> None:
    """A bundle folder for ``umoci repack``: the metadata found in ``meta``, an empty rootfs mount point."""
    bundle.mkdir(parents=True)
    for path in meta.iterdir():
        if path.name != "rootfs":
            shutil.copy2(path, bundle / path.name)
    (bundle / "rootfs").mkdir(mode=0o755)


def export(oci: Path, tag: str, reference: str, dest: Path, work: Path) -> None:
    """``oci:tag`` as a docker-archive tarball holding ``reference``, renamed into place when complete."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    env = {**os.environ, "TMPDIR": str(work)}
    run(["skopeo", "copy", "--quiet", f"oci:{oci}:{tag}", f"docker-archive:{tmp}:{reference}"], env=env)
    os.replace(tmp, dest)


def overlay_mount(root: Path, lowers: Sequence[Path], upper: Path, work: Path) -> list[str]:
    """The command mounting ``lowers`` (topmost first) with ``upper`` taking the changes at ``root``."""
    for path in (*lowers, upper, work):
        if "," in str(path) or ":" in str(path):
            raise BuildError(f"overlayfs cannot take a path with ',' or ':': {path}")
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    options = f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={upper},workdir={work}"
    return ["mount", "-t", "overlay", "overlay", "-o", options, str(root)]


def chroot_commands(root: Path, inputs: Path, command: Sequence[str], env: Sequence[str]) -> list[list[str]]:
    """Run ``command`` in ``root`` with only ``env``, /dev, /proc and ``inputs`` (at /mnt) mounted."""
    return [
        ["mount", "--bind", "/dev", f"{root}/dev"],
        ["mount", "-t", "proc", "proc", f"{root}/proc"],
        ["mount", "--bind", str(inputs), f"{root}/mnt"],
        ["chroot", str(root), "/usr/bin/env", "-i", *env, *command],
        ["umount", f"{root}/mnt", f"{root}/proc", f"{root}/dev"],
    ]


def in_mount_namespace(commands: Sequence[Sequence[str]]) -> None:
    """Run commands in a private mount namespace: whatever they mount is gone when they exit."""
    script = "\n".join(shlex.join(command) for command in commands)
    run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", script])

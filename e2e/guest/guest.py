"""A QEMU guest booting Debian's stock kernel, so that IPVS and IPIP, which this machine's kernel lacks, are
tested with real packets on any Debian machine (and in CI) without a VM image or a container registry.

What is built, once, from Debian packages, into the git-ignored `.cache/guest/` (see README.md):

- `kernel-<version>/vmlinuz` and `kernel-<version>/root/lib/modules/<version>/`: `linux-image-<version>`
  fetched with `apt-get download` (the version `linux-image-amd64` depends on), unpacked with `dpkg -x`,
  its modules pruned to what networking tests load (net/, netfilter, IPVS, IPIP, veth, bridge, virtio,
  9p, crypto) and indexed with `depmod`.
- `initrd-<digest>.gz`: a busybox (`busybox-static`) initramfs, packed with `cpio`, whose `/init` loads
  virtio and 9p, mounts the host's root read-only over 9p at `/newroot`, mounts proc, sys, dev, tmpfs on
  `/tmp` and `/run`, and the run's share folder read-write at its own host path, then runs the command
  as root in a chroot of the host root and powers off.

So inside the guest the host's own files are where they are on the host: python3 (and the repository's
`.venv`, whose `python` links to it), the installed `layerlb` package, `ipvsadm`, `ip`, `nft`. Kernel
modules load on demand: the kernel's module helper (`/proc/sys/kernel/modprobe`) is a script that runs
the host's kmod `modprobe -d` against the cached module tree, so IPVS schedulers and nftables
expressions load as they would on a Debian host.

Results travel through the share folder, never the console: the command's output goes to
`<share>/.guest/output`, its exit code to `<share>/.guest/exit-code`; the serial console (kernel
messages, `/init`'s complaints) is kept in `<share>/.guest/console.log` for diagnosis.

KVM opens here but guests hang at boot, so the guest runs under software emulation (`-accel tcg`),
where everything runs 10-20 times slower than on the host. Two things keep a boot short: QEMU boots
the kernel uncompressed (`vmlinux`, through its PVH entry; decompressing Debian's xz image under
emulation took longer than the boot itself), and the command starts 3-5 s after QEMU does (more when
the host is busy). Start the interpreter by its real path (`sys.executable`, the repository's
`.venv/bin/python`): pyenv's `python3` shim is a shell script that starts a dozen processes, which costs
seconds under emulation. Importing layerlb (pydantic models) takes another 5-7 s.

    from e2e.guest.guest import run_in_guest
    code, output = run_in_guest(["ipvsadm", "-Ln"])

Command line: `python -m e2e.guest.guest build` (prepare the cache) and
`python -m e2e.guest.guest run -- COMMAND...` (print its output, exit with its code).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "guest"

# Bump when the way the kernel folder is prepared changes, so caches built by an older recipe are redone.
KERNEL_RECIPE = 2
# Modules in the initramfs, loaded by /init (with their dependencies) before the host root can be mounted.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio-rng")
# Loaded at boot through modprobe; anything else loads on demand.
DEFAULT_PRELOAD = (
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_wlc",
    "ip_vs_lc",
    "ip_vs_sh",
    "ip_vs_mh",
    "veth",
    "bridge",
    "ipip",
)
# Module folders kept from the kernel package (with everything they depend on); the rest is deleted.
KEEP = re.compile(
    r"^kernel/("
    r"net/(ipv4|ipv6|netfilter|bridge|8021q|core|sched|packet|xfrm|llc|802)/"
    r"|net/9p/(9pnet|9pnet_virtio)\.ko"
    r"|drivers/net/(veth|dummy|macvlan|tun|vxlan/vxlan|geneve|ipvlan/ipvlan|virtio_net)\.ko"
    r"|drivers/virtio/|drivers/char/hw_random/"
    r"|fs/9p/|fs/netfs/|fs/fscache/"
    r"|crypto/|arch/x86/crypto/|lib/"
    r")"
)

INIT = r"""#!/bin/sh
# layerlb's guest init: mount the host root over 9p, run one command in a chroot of it, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot /sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "layerlb guest init: $*" >/dev/console; sync; poweroff -f; }
for word in $(cat /proc/cmdline); do
  case "$word" in
    llb.share=*) share="${word#llb.share=}" ;;
    llb.modroot=*) modroot="${word#llb.modroot=}" ;;
    llb.preload=*) preload="$(echo "${word#llb.preload=}" | tr , ' ')" ;;
    llb.cache=*) cache="${word#llb.cache=}" ;;
    llb.keep=*) keep="${word#llb.keep=}" ;;
  esac
done
while read -r module; do
  insmod "/modules/$module" || fail "insmod $module"
done </modules/order
r=/newroot
mount -t 9p -o "trans=virtio,version=9p2000.L,ro,msize=262144,cache=${cache:-loose}" hostroot "$r" \
  || fail "mounting the host root"
mount -t proc proc "$r/proc" && mount -t sysfs sys "$r/sys" && mount -t devtmpfs dev "$r/dev" \
  || fail "mounting proc, sys, dev"
mkdir -p "$r/dev/pts" "$r/dev/shm"
# The repository may live under /tmp or /run (a CI clone), which get fresh tmpfs below: keep it visible.
if [ -n "$keep" ]; then mkdir -p /keep && mount -o bind "$r$keep" /keep || fail "binding $keep"; fi
mount -t devpts devpts "$r/dev/pts" && mount -t tmpfs shm "$r/dev/shm" \
  && mount -t tmpfs tmp "$r/tmp" && mount -t tmpfs run "$r/run" || fail "mounting tmpfs"
if [ -n "$keep" ]; then mkdir -p "$r$keep" && mount -o bind /keep "$r$keep" || fail "re-binding $keep"; fi
mkdir -p "$r$share" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=262144 share "$r$share" || fail "mounting the share"
printf '#!/bin/sh\nexec chroot %s /sbin/modprobe -d %s "$@"\n' "$r" "$modroot" >/sbin/modprobe
chmod +x /sbin/modprobe
echo /sbin/modprobe >/proc/sys/kernel/modprobe
[ -z "$preload" ] || /sbin/modprobe -a $preload || fail "modprobe $preload"
ip link set lo up
g="$share/.guest"
cat /proc/uptime >"$r$g/uptime-start"
chroot "$r" /usr/bin/env -i HOME=/root LANG=C.UTF-8 /bin/sh "$g/command.sh" >"$r$g/output" 2>&1 </dev/null
echo $? >"$r$g/exit-code"
cat /proc/uptime >"$r$g/uptime-end"
sync
poweroff -f
"""


class GuestError(RuntimeError):
    """The guest could not be built, or did not run the command to the end (the message says where)."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: kernel, initramfs, and the module tree the guest's modprobe reads over 9p."""

    kernel_version: str
    kernel: Path  # the uncompressed vmlinux where it could be made, else the bzImage
    initrd: Path
    modules_root: Path  # holds lib/modules/<kernel_version>/


@dataclass(frozen=True)
class GuestRun:
    """What one boot produced: the command's exit code and output, and where the time went."""

    exit_code: int
    output: str
    boot_seconds: float  # guest uptime when the command started
    command_seconds: float  # guest uptime spent in the command
    wall_seconds: float  # QEMU start to exit, on the host
    console: str


# --- building ----------------------------------------------------------------------------------------


def _run(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise GuestError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def _need(tool: str) -> str:
    path = shutil.which(tool) or next(
        (str(p) for p in (Path("/usr/sbin") / tool, Path("/sbin") / tool) if p.exists()), None
    )
    if path is None:
        raise GuestError(f"{tool} is missing; run `make system-packages` (scripts/system-packages.sh)")
    return path


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time: parallel test runs wait for the first build instead of racing it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _kernel_package() -> str:
    """The versioned kernel package Debian's `linux-image-amd64` points at (apt lists refreshed if absent)."""

    def ask() -> str | None:
        done = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=False
        )
        match = re.search(r"Depends:\s*(linux-image-\S+-amd64)", done.stdout)
        return match.group(1) if match else None

    package = ask()
    if package is None:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        _run([*sudo, "apt-get", "update", "-q"])
        package = ask()
    if package is None:
        raise GuestError("apt-cache knows no linux-image-amd64; is this a Debian amd64 machine?")
    return package


def _modules_dep(folder: Path) -> dict[str, list[str]]:
    dep: dict[str, list[str]] = {}
    for line in (folder / "modules.dep").read_text().splitlines():
        name, _, deps = line.partition(":")
        dep[name] = deps.split()
    return dep


def _closure(dep: Mapping[str, Sequence[str]], roots: Sequence[str]) -> list[str]:
    """`roots` and everything they depend on, dependencies first (the order insmod needs)."""
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(module: str) -> None:
        if module in seen:
            return
        seen.add(module)
        for needed in reversed(dep[module]):  # modules.dep lists the deepest dependency last
            visit(needed)
        ordered.append(module)

    for root in roots:
        visit(root)
    return ordered


def _build_kernel() -> Path:
    package = _kernel_package()
    version = package.removeprefix("linux-image-")
    target = CACHE / f"kernel-{version}"
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        work = Path(scratch)
        print(f"[guest] fetching {package} (once; cached in {target})", file=sys.stderr)
        _run(["apt-get", "download", "-q", package], cwd=work)
        deb = next(work.glob("linux-image-*.deb"))
        unpacked = work / "unpacked"
        _run([_need("dpkg"), "-x", str(deb), str(unpacked)])
        deb.unlink()
        found = [p for p in unpacked.glob("*/modules/*") if p.is_dir()]
        found += [p for p in unpacked.glob("usr/lib/modules/*") if p.is_dir()]
        if len(found) != 1:
            raise GuestError(f"{package}: expected one module folder, found {found}")
        kernel_version = found[0].name
        root = work / "root"
        modules = root / "lib" / "modules" / kernel_version
        modules.parent.mkdir(parents=True)
        shutil.move(str(found[0]), modules)
        depmod = _need("depmod")
        _run([depmod, "-b", str(root), kernel_version])
        dep = _modules_dep(modules)
        keep = set(_closure(dep, [m for m in dep if KEEP.match(m)]))
        for module in dep:
            if module not in keep:
                (modules / module).unlink()
        for folder in sorted((p for p in modules.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        _run([depmod, "-b", str(root), kernel_version])
        vmlinuz = next(unpacked.glob("boot/vmlinuz-*"))
        staged = work / "kernel"
        staged.mkdir()
        shutil.move(str(vmlinuz), staged / "vmlinuz")
        shutil.move(str(root), staged / "root")
        stamp = {"package": package, "kernel_version": kernel_version, "recipe": KERNEL_RECIPE}
        (staged / "ready.json").write_text(json.dumps(stamp) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def _cached_kernel() -> Path | None:
    """The newest complete kernel folder of the current recipe, if any (no apt needed then)."""
    candidates = []
    for stamp in CACHE.glob("kernel-*/ready.json"):
        with contextlib.suppress(ValueError, OSError):
            if json.loads(stamp.read_text()).get("recipe") == KERNEL_RECIPE:
                candidates.append(stamp.parent)
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _vmlinux(kernel: Path) -> Path:
    """The kernel uncompressed (an ELF with a PVH entry, which QEMU boots directly), else the bzImage.

    Under emulation, decompressing Debian's xz bzImage takes longer than booting it: the uncompressed
    kernel saves seconds on every boot. Made once, next to `vmlinuz`.
    """
    elf = kernel / "vmlinux"
    if elf.exists():
        return elf
    image = (kernel / "vmlinuz").read_bytes()
    decompressors: list[tuple[bytes, Callable[[], Any]]] = [
        (b"\xfd7zXZ\x00", lzma.LZMADecompressor),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    ]
    for magic, make in decompressors:
        start = image.find(magic)
        if start < 0:
            continue
        with contextlib.suppress(lzma.LZMAError, zlib.error):
            data = make().decompress(image[start:])
            if data[:4] == b"\x7fELF":
                partial = elf.with_suffix(".partial")
                partial.write_bytes(data)
                partial.rename(elf)
                return elf
    return kernel / "vmlinuz"  # an unknown compression: QEMU boots the bzImage as it is


def _cpio_newc(entries: Sequence[tuple[str, int, bytes]]) -> bytes:
    """A `newc` cpio archive of (path, mode, content) entries, what the kernel unpacks as initramfs.

    A character device's content is its `major:minor` (the archive stores no data for it).
    """
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for number, (name, mode, content) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        major, minor, data = 0, 0, content
        if mode & 0o170000 == 0o020000:
            major, minor = (int(part) for part in content.decode().split(":"))
            data = b""
        fields = [number, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(encoded), 0]
        out.extend(b"070701" + "".join(f"{value:08x}" for value in fields).encode() + encoded)
        pad()
        out.extend(data)
        pad()
    return bytes(out)


def _build_initrd(kernel: Path, kernel_version: str) -> Path:
    """The busybox initramfs; named by a digest of what goes in, so a changed /init rebuilds it."""
    busybox = Path(_need("busybox")).resolve()
    modules = kernel / "root" / "lib" / "modules" / kernel_version
    dep = _modules_dep(modules)
    by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in dep}
    wanted = []
    for name in INITRAMFS_MODULES:
        module = by_name.get(name.replace("-", "_"))
        if module is None:
            raise GuestError(f"kernel {kernel_version} has no module {name}")
        wanted.append(module)
    order = _closure(dep, wanted)
    digest = hashlib.sha256()
    for part in (INIT.encode(), busybox.read_bytes(), kernel_version.encode(), "\n".join(order).encode()):
        digest.update(hashlib.sha256(part).digest())
    initrd = CACHE / f"initrd-{digest.hexdigest()[:16]}.gz"
    if initrd.exists():
        return initrd
    # busybox-static's binary is a regular file of mode 0755; modes here are S_IFREG/S_IFDIR|permissions.
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),  # a symlink: the content is its target
        ("dev", 0o040755, b""),
        ("dev/console", 0o020600, b"5:1"),  # init's first stdin/stdout, before devtmpfs is mounted
        ("init", 0o100755, INIT.encode()),
        ("modules", 0o040755, b""),
        ("modules/order", 0o100644, "".join(Path(m).name + "\n" for m in order).encode()),
    ]
    entries += [(f"modules/{Path(m).name}", 0o100644, (modules / m).read_bytes()) for m in order]
    partial = initrd.with_suffix(".partial")
    with gzip.open(partial, "wb", compresslevel=6) as out:
        out.write(_cpio_newc(entries))
    partial.rename(initrd)
    return initrd


def build() -> GuestImage:
    """The guest's kernel and initramfs, built on first use and cached so that later boots start at once
    (needs apt, dpkg, depmod, busybox-static)."""
    with _locked():
        kernel = _cached_kernel() or _build_kernel()
        stamp = json.loads((kernel / "ready.json").read_text())
        kernel_version = str(stamp["kernel_version"])
        initrd = _build_initrd(kernel, kernel_version)
        vmlinux = _vmlinux(kernel)
    return GuestImage(kernel_version, vmlinux, initrd, kernel / "root")


# --- running -----------------------------------------------------------------------------------------


def _script(command: str | Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    text = command if isinstance(command, str) else shlex.join(command)
    lines = ["#!/bin/sh", "# written by e2e/guest/guest.py: runs as root inside the guest"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    lines += [f"cd {shlex.quote(str(cwd))} || exit 125", text, ""]
    return "\n".join(lines)


def _uptime(path: Path) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(path.read_text().split()[0])
    return None


def run_guest(
    command: str | Sequence[str],
    *,
    share: Path | None = None,
    timeout: float = 300.0,
    cwd: Path = ROOT,
    env: Mapping[str, str] | None = None,
    memory_mb: int = 1024,
    preload: Sequence[str] = DEFAULT_PRELOAD,
    root_cache: str = "loose",
    kernel_args: Sequence[str] = ("quiet", "loglevel=4"),
    cpu: str = "max",
    network: bool = False,
) -> GuestRun:
    """Runs `command` (a shell line, or an argv) as root in `cwd` on Debian's kernel, where what this
    host's kernel lacks (IPVS, IPIP) exists: boots the guest, runs it, powers off.

    `share` is mounted read-write at its own path (files the command writes there are on the host
    afterwards); by default a fresh folder under `.cache/guest/runs/`, deleted after a run that finished
    (kept when GuestError is raised, for its console log). The environment is `env` over a
    minimal one (PATH as the host's, HOME, LANG, PYTHONDONTWRITEBYTECODE; the host root is read-only).
    `root_cache` is the 9p cache mode of the host root (`loose` for speed; `none` if host files change
    while the guest runs and it must see that). Raises GuestError when the guest does not finish the
    command within `timeout` seconds (the message carries the console's tail). `kernel_args` go on
    the kernel command line (drop `quiet` to see the boot on the console). `network`: a virtio NIC on
    QEMU's user network (`eth0`, left down: the command sets it up, e.g. 10.0.2.15/24), where 10.0.2.2
    is the host's loopback.
    """
    image = build()
    temporary = share is None
    if share is None:
        (CACHE / "runs").mkdir(parents=True, exist_ok=True)
        share = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE / "runs"))
    share = share.resolve()
    for path in (share, image.modules_root):
        if re.search(r"\s|,", str(path)):
            raise GuestError(f"{path}: guest paths may hold no spaces or commas (kernel command line, QEMU)")
    control = share / ".guest"
    if control.exists():
        shutil.rmtree(control)
    control.mkdir(parents=True)
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    base = {"PATH": f"{os.environ.get('PATH', '')}:{system_path}".lstrip(":"), "PYTHONDONTWRITEBYTECODE": "1"}
    (control / "command.sh").write_text(_script(command, cwd, {**base, **(env or {})}))
    append = " ".join(
        [
            "console=ttyS0",
            *kernel_args,
            "panic=-1",
            "random.trust_cpu=on",
            f"llb.share={share}",
            f"llb.modroot={image.modules_root}",
            f"llb.preload={','.join([*preload, *(['virtio_net'] if network else [])])}",
            f"llb.cache={root_cache}",
            *([f"llb.keep={ROOT}"] if ROOT.is_relative_to("/tmp") or ROOT.is_relative_to("/run") else []),
        ]
    )
    argv = [
        _need("qemu-system-x86_64"),
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-machine", "pc", "-accel", "tcg", "-cpu", cpu, "-smp", "1", "-m", str(memory_mb),
        "-display", "none", "-serial", "stdio",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=share,path={share},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=share,mount_tag=share",
        "-device", "virtio-rng-pci",
        *(["-nic", "user,model=virtio-net-pci"] if network else []),
    ]  # fmt: skip
    console_path = control / "console.log"
    started = time.monotonic()
    with open(console_path, "wb") as console:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        try:
            qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
            raise GuestError(
                f"the guest did not finish within {timeout:.0f} s; console tail:\n{_tail(console_path)}"
            ) from None
    wall = time.monotonic() - started
    console_text = console_path.read_text(errors="replace")
    try:
        exit_code = int((control / "exit-code").read_text().strip())
    except (OSError, ValueError):
        raise GuestError(
            f"the guest stopped without running the command to the end (qemu exit {qemu.returncode}); "
            f"console tail:\n{_tail(console_path)}"
        ) from None
    output = (control / "output").read_text(errors="replace")
    start, end = _uptime(control / "uptime-start"), _uptime(control / "uptime-end")
    boot = start if start is not None else float("nan")
    spent = end - start if start is not None and end is not None else float("nan")
    if temporary:
        shutil.rmtree(share, ignore_errors=True)
    return GuestRun(exit_code, output, boot, spent, wall, console_text)


def guest_findings(module: str, *args: str, share: Path, timeout: float) -> dict[str, Any]:
    """Boots the guest on `python -m MODULE ARGS RESULT` (a scenario that writes its findings as JSON to the
    path it gets last, as `tests/kernel/guest_scenarios.record` does) and returns those findings, with the
    boot and wall times; fails with the guest's output and console tail when it wrote none or an error."""
    result = share / "result.json"
    run = run_guest(
        [sys.executable, "-m", module, *args, str(result)],
        share=share,
        timeout=timeout,
        # the checkout's own sources, also when an editable install points at another checkout
        env={"PYTHONPATH": os.pathsep.join(str(ROOT / part) for part in ("", "dataplane", "operator"))},
    )
    context = f"guest output:\n{run.output[-4000:]}\nconsole tail:\n{run.console[-2000:]}"
    what = " ".join((module, *args))
    assert result.exists(), f"{what} wrote no result (exit {run.exit_code})\n{context}"
    found: dict[str, Any] = json.loads(result.read_text())
    assert "error" not in found, f"{what} failed inside the guest:\n{found['error']}\n{context}"
    found["boot_seconds"] = run.boot_seconds
    found["wall_seconds"] = run.wall_seconds
    return found


def run_in_guest(
    command: str | Sequence[str], share: Path | None = None, timeout: float = 300.0
) -> tuple[int, str]:
    """Runs `command` as root in a freshly booted guest, for callers that need only (exit code, output);
    see `run_guest`."""
    run = run_guest(command, share=share, timeout=timeout)
    return run.exit_code, run.output


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no console output)"


def main(argv: Sequence[str] | None = None) -> int:
    """`build` prepares the cache; `run -- COMMAND...` runs a command in the guest and relays its result."""
    parser = argparse.ArgumentParser(prog="python -m e2e.guest.guest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build", help="build (or find) the cached kernel and initramfs")
    run = sub.add_parser("run", help="boot, run a command as root, power off")
    run.add_argument("--timeout", type=float, default=300.0)
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "build":
        image = build()
        print(f"kernel {image.kernel_version}: {image.kernel}\ninitramfs: {image.initrd}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a command")
    result = run_guest(command, timeout=args.timeout)
    sys.stdout.write(result.output)
    print(
        f"[guest] exit {result.exit_code}; boot {result.boot_seconds:.2f} s, command "
        f"{result.command_seconds:.2f} s, wall {result.wall_seconds:.2f} s",
        file=sys.stderr,
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

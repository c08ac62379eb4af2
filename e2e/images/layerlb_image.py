"""layerlb's image without Docker: what the Dockerfile builds, made from the same recipe in three layers.

1. Debian: ``debootstrap --variant=minbase`` of the packages images/layerlb-rootfs.sh lists, then its
   ``clean`` step. Kept in ``stages/debian-KEY`` (keyed by the script, its packages and the suite).
2. The script's ``venv`` step with the dependency wheels (fetched on this host for bookworm's CPython,
   pinned to the versions of the repository's ``.venv``: the image runs what the tests run). Kept in
   ``stages/deps-KEY`` as an overlay upper folder over layer 1, with the wheels.
3. The same ``venv`` step with the project's wheel, built here from the files the Dockerfile's context
   holds: the only layer a change to the sources rebuilds (seconds).

The ENV, WORKDIR, USER, ENTRYPOINT and CMD are read from the Dockerfile itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import sys
import tomllib
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from e2e.images import oci
from e2e.images.oci import PATH_ENV, BuildError, ImageConfig, digest, log, run, timed

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / "images" / "layerlb-rootfs.sh"
DOCKERFILE = REPO_ROOT / "Dockerfile"
# What the Dockerfile's build context holds for the `venv` step; the wheel is built from these: the
# shared core and its templates, and every source root pyproject.toml names (operator/, dataplane/,
# speaker/, ...), so a new component cannot be left out of the image.
PROJECT_FILES = (
    "pyproject.toml",
    "README.md",
    "layerlb",
    "templates",
    *(
        root
        for root in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]["find"]["where"]
        if root != "."
    ),
)

SUITE = "bookworm"  # the Dockerfile's debian:bookworm-slim
TARGET_PYTHON = "3.11"  # bookworm's python3: the dependency wheels are fetched for it
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Bump when this file makes a stage differently: the stage keys hash the recipe, not this code.
STAGE_FORMAT = "2"
# The chroot steps get this environment only (not the host's PIP_* settings). Temporary files go to
# /mnt/tmp, on the host: even an emptied /tmp would change, and land in the layer.
CHROOT_ENV = (PATH_ENV, "HOME=/root", "LANG=C.UTF-8", "TMPDIR=/mnt/tmp")


def inputs() -> str:
    """Digest of everything the image is built from: the recipe, the dependencies, the sources, the config."""
    return digest(_deps_key(_debian_key()), _tree_digest(REPO_ROOT, PROJECT_FILES), repr(dockerfile_config()))


def build(work: Path, out: Path) -> None:
    """The image as ``work/oci:image``; stages are reused from, or added to, ``out/stages``."""
    debian_key = _debian_key()
    debian = _debian_stage(work / "debian", out, debian_key)
    deps = _deps_stage(work / "deps", out, debian, _deps_key(debian_key))
    for old in (out / "stages").iterdir():
        if old not in (debian, deps):
            log(f"layerlb: removing the stale stage {old.name}")
            shutil.rmtree(old)
    mnt = _chroot_inputs(work)
    (mnt / "wheels").mkdir()
    for wheel in (deps / "mnt" / "wheels").iterdir():
        os.link(wheel, mnt / "wheels" / wheel.name)
    with timed("layerlb: the project's wheel"):
        wheel = _project_wheel(work / "src", mnt / "wheels", mnt / "dist")
    oci.link_layout(deps / "oci", work / "oci")
    bundle = work / "bundle"
    oci.bundle_from(deps / "meta", bundle)
    with timed("layerlb: layer 3, the project installed into the virtual environment"):
        oci.in_mount_namespace([
            oci.overlay_mount(bundle / "rootfs", [deps / "upper", debian / "bundle" / "rootfs"],
                              work / "upper", work / "overlay-work"),
            *_recipe_in_chroot(bundle / "rootfs", mnt, "venv", "--no-index", "--find-links=/mnt/wheels",
                               f"/mnt/dist/{wheel.name}"),
            oci.repack_command(work / "oci", "image", bundle, f"{RECIPE.name} venv {wheel.name}"),
        ])  # fmt: skip
    _check_upper(work / "upper")
    dockerfile_config().apply(work / "oci", "image")


def dockerfile_config(path: Path = DOCKERFILE) -> ImageConfig:
    """ENV, USER, WORKDIR and the exec-form ENTRYPOINT and CMD of a Dockerfile, as literal values."""
    text = re.sub(r"\\\n", " ", path.read_text())
    env: list[str] = []
    fields: dict[str, str] = {}
    lists: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        keyword, rest = words[0].upper(), words[1] if len(words) > 1 else ""
        if keyword in ("ENV", "USER", "WORKDIR", "ENTRYPOINT", "CMD") and "$" in rest:
            raise BuildError(
                f"{path}: {keyword} uses a variable ({rest}); build.py takes literal values only"
            )
        if keyword == "ENV":
            for item in shlex.split(rest):
                if "=" not in item:
                    raise BuildError(f"{path}: ENV {rest!r}: write KEY=VALUE pairs")
                env.append(item)
        elif keyword in ("USER", "WORKDIR"):
            fields[keyword] = rest.strip()
        elif keyword in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest) if rest.strip().startswith("[") else None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BuildError(f"{path}: {keyword} {rest}: write the exec form, a JSON list of strings")
            lists[keyword] = tuple(value)
    return ImageConfig(
        env=tuple(env), user=fields.get("USER"), workdir=fields.get("WORKDIR"),
        entrypoint=lists.get("ENTRYPOINT"), cmd=lists.get("CMD"),
    )  # fmt: skip


def packages() -> list[str]:
    return run(["sh", RECIPE, "packages"]).split()


# -------------------------------------------------------------------------------------------- keys


def _tree_digest(root: Path, entries: Iterable[str]) -> str:
    """Digest of files and folders under ``root``: names, executable bits, contents, symlink targets."""
    parts: list[str | bytes] = []
    for entry in entries:
        top = root / entry
        for path in [top] if not top.is_dir() or top.is_symlink() else sorted(top.rglob("*")):
            if (
                "__pycache__" in path.parts
                or path.suffix == ".pyc"
                or (path.is_dir() and not path.is_symlink())
            ):
                continue
            parts.append(str(path.relative_to(root)))
            if path.is_symlink():
                parts.append(b"link:" + os.readlink(path).encode())
            else:
                parts += [b"x" if os.access(path, os.X_OK) else b"-", path.read_bytes()]
    return digest(*parts)


def _debian_key() -> str:
    return digest(STAGE_FORMAT, SUITE, "minbase", " ".join(packages()), RECIPE.read_bytes())


def _requirements() -> tuple[list[str], list[str]]:
    """The project's dependencies and its build requirements, as pyproject.toml lists them."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    deps = pyproject.get("project", {}).get("dependencies", [])
    build_requires = pyproject.get("build-system", {}).get("requires", [])
    return [str(d) for d in deps], [str(r) for r in build_requires]


def _name(requirement: str) -> str:
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    return re.sub(r"[-_.]+", "-", found.group(0)).lower() if found else ""


def _pins(requirements: Sequence[str]) -> list[str]:
    """``name==version`` for the requirements and what they pull in, as installed in the repository's
    ``.venv`` (else in the running interpreter's environment)."""
    site = sorted(REPO_ROOT.glob(".venv/lib/python3*/site-packages"))
    dists = metadata.distributions(path=[str(s) for s in site]) if site else metadata.distributions()
    installed = {_name(d.metadata["Name"] or ""): d for d in dists}
    pins: dict[str, str] = {}
    todo = [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        dist = installed.get(name)
        if name in pins or dist is None or name == "layerlb":
            continue
        pins[name] = dist.version
        # Not the optional extras (their test and dev tools); other markers stay in: a superset is harmless.
        todo += [_name(r) for r in dist.requires or () if "extra" not in r.partition(";")[2]]
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _deps_key(debian_key: str) -> str:
    deps, build_requires = _requirements()
    return digest(STAGE_FORMAT, debian_key, TARGET_PYTHON, *deps, "|", *_pins(deps), "|", *build_requires)


# ------------------------------------------------------------------------------------------ stages


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (LAYERLB_DEBIAN_MIRROR wins)."""
    if env := os.environ.get("LAYERLB_DEBIAN_MIRROR"):
        return env
    sources = [*sorted(Path("/etc/apt").glob("sources.list.d/*.sources")), Path("/etc/apt/sources.list")]
    for source in sources:
        with contextlib.suppress(OSError):
            for uri in re.findall(r"(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+)", source.read_text(), re.M):
                if uri.rstrip("/").endswith("/debian"):
                    return str(uri.rstrip("/"))
    return DEFAULT_MIRROR


def _chroot_inputs(work: Path) -> Path:
    """The folder (work/mnt) a chroot step sees at /mnt: the recipe script and a temporary folder."""
    mnt = work / "mnt"
    (mnt / "tmp").mkdir(parents=True)
    shutil.copy(RECIPE, mnt / RECIPE.name)
    return mnt


def _recipe_in_chroot(root: Path, mnt: Path, *args: str) -> list[list[str]]:
    return oci.chroot_commands(root, mnt, ["sh", f"/mnt/{RECIPE.name}", *args], CHROOT_ENV)


def _debian_stage(work: Path, out: Path, key: str) -> Path:
    """Layer 1: the debootstrapped rootfs (bundle/rootfs) and its image (oci:debian), built once per key."""
    stage = out / "stages" / f"debian-{key[:16]}"
    if (stage / "oci" / "index.json").is_file():
        return stage
    work.mkdir(parents=True)
    layout, bundle = work / "oci", work / "bundle"
    rootfs = bundle / "rootfs"
    oci.new_image(layout, "debian", bundle)
    mnt = _chroot_inputs(work)
    debs = out / "debs"  # downloaded packages, kept across keys
    debs.mkdir(exist_ok=True)
    names, mirror = packages(), _mirror()
    with timed(f"layerlb: debootstrap {SUITE} from {mirror} with {', '.join(names)} (cached afterwards)"):
        oci.in_mount_namespace([
            ["debootstrap", "--variant=minbase", f"--include={','.join(names)}", f"--cache-dir={debs}",
             SUITE, str(rootfs), mirror],
            *_recipe_in_chroot(rootfs, mnt, "clean"),
        ])  # fmt: skip
    version = run(["chroot", rootfs, "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    if version.strip() != TARGET_PYTHON:
        raise BuildError(
            f"{SUITE}'s python3 is {version.strip()}, build.py fetches wheels for {TARGET_PYTHON}"
        )
    # The runtime mounts /dev, /etc/hostname and /etc/resolv.conf; debootstrap left the host's in.
    for path in [*(rootfs / "dev").iterdir(), rootfs / "etc" / "hostname", rootfs / "etc" / "resolv.conf"]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    with timed("layerlb: layer 1, the Debian rootfs"):
        run(oci.repack_command(layout, "debian", bundle, f"debootstrap --variant=minbase {SUITE}"))
    shutil.rmtree(mnt)
    os.rename(work, stage)
    return stage


def _fetch_wheels(wheels: Path) -> None:
    """Dependency wheels for bookworm's CPython, and the build requirements, fetched on this host."""
    deps, build_requires = _requirements()
    (wheels / "requirements.txt").write_text("\n".join(deps) + "\n")
    (wheels / "constraints.txt").write_text("\n".join(_pins(deps)) + "\n")
    platforms = [
        f"--platform=manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)
    ]  # bookworm: glibc 2.36
    target = ["--only-binary=:all:", *platforms, f"--python-version={TARGET_PYTHON}", "--implementation=cp"]
    pip = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(wheels),
    ]
    run([*pip, *target, "-r", str(wheels / "requirements.txt"), "-c", str(wheels / "constraints.txt")])
    run([*pip, "--only-binary=:all:", *build_requires])


def _deps_stage(work: Path, out: Path, debian: Path, key: str) -> Path:
    """Layer 2: /opt/layerlb with the dependencies (upper/ over the Debian rootfs, oci:deps, meta/ for
    umoci, mnt/wheels)."""
    stage = out / "stages" / f"deps-{key[:16]}"
    if (stage / "oci" / "index.json").is_file():
        return stage
    mnt = _chroot_inputs(work)
    (mnt / "wheels").mkdir()
    with timed("layerlb: fetching the dependency wheels"):
        _fetch_wheels(mnt / "wheels")
    oci.link_layout(debian / "oci", work / "oci")
    bundle = work / "bundle"
    oci.bundle_from(debian / "bundle", bundle)
    with timed("layerlb: layer 2, the virtual environment with the dependencies"):
        oci.in_mount_namespace([
            oci.overlay_mount(bundle / "rootfs", [debian / "bundle" / "rootfs"], work / "upper",
                              work / "overlay-work"),
            *_recipe_in_chroot(bundle / "rootfs", mnt, "venv", "--no-index", "--find-links=/mnt/wheels",
                               "-r", "/mnt/wheels/requirements.txt", "-c", "/mnt/wheels/constraints.txt"),
            oci.repack_command(work / "oci", "deps", bundle, f"{RECIPE.name} venv -r requirements.txt"),
        ])  # fmt: skip
    _check_upper(work / "upper")
    (bundle / "rootfs").rmdir()
    bundle.rename(work / "meta")
    shutil.rmtree(work / "overlay-work")
    os.rename(work, stage)
    return stage


def _project_wheel(src: Path, wheels: Path, dist: Path) -> Path:
    """layerlb's wheel from a copy of the project's files (pip would write build/ into the repository)."""
    src.mkdir()
    for entry in PROJECT_FILES:
        origin = REPO_ROOT / entry
        if origin.is_dir():
            shutil.copytree(
                origin, src / entry, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(origin, src / entry)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-index", "--find-links", wheels, "-w", dist, src])  # fmt: skip
    [wheel] = dist.glob("layerlb-*.whl")
    return wheel


def _check_upper(upper: Path) -> None:
    """The venv step may write /opt/layerlb only: anything else would be a layer nobody meant."""
    extra = sorted(p.name for p in upper.iterdir() if p.name != "opt")
    extra += sorted(f"opt/{p.name}" for p in (upper / "opt").iterdir() if p.name != "layerlb")
    if extra:
        raise BuildError(f"the venv step wrote outside /opt/layerlb: {extra}")

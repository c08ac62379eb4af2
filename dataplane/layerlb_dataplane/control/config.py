"""Where the data plane's Plans come from, and how it learns they changed.

The runtime reads Plans only through `PlanSource`, so that the standalone files of `layerlb serve` (its
YAML front end is the CLI's, `layerlb.cli.YamlFiles`: the data plane reads Plans only), the Plan JSON of
the forwarding pod, the Plans a worker receives from its parent, and the operator's ConfigMap
watched through the Kubernetes API (`kube_source`) all reload through one path: `start()` once, then wait
for `changed()`, call `load()`, apply what it returns, or keep serving the old Plans when it raises
`InvalidConfig`; after each apply the runtime tells the source what is now served (`applied`), which the
ConfigMap source reports back to the operator.

File sources poll: a cheap `stat` every interval (mtime, size, inode: an atomic rename or the kubelet's
`..data` symlink swap changes the inode), then a content hash, so touching a file without changing it does
not reload. SIGHUP is the runtime's business: it calls `load()` directly.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic

from layerlb import plan

POLL_SECONDS = 1.0


class InvalidConfig(Exception):
    """The source's content cannot be served; `lines` are what the user reads (`FILE: KIND/NAME: path: reason`)."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


class PlanSource(abc.ABC):
    """A place Plans are read from; the operator's ConfigMap watcher implements the same two methods."""

    description: str = "plans"

    @abc.abstractmethod
    def load(self) -> list[plan.Plan]:
        """The Plans now, one per LoadBalancer; raise `InvalidConfig` when they cannot be served."""

    @abc.abstractmethod
    async def changed(self) -> None:
        """Return when `load()` may give something new (a change noticed); never returns for a fixed source."""

    async def start(self) -> None:
        """Return once `load()` has something to give (files: at once; the API: the first valid Plans)."""
        return None

    def applied(self, serving: Mapping[str, int], warnings: Sequence[str] = ()) -> None:
        """What is now fully served (LoadBalancer key → Plan generation), after every apply, and what the node
        lacks though it serves (`warnings`, e.g. strict ARP not set; also when only they change); most
        ignore it."""
        return None


class StaticSource(PlanSource):
    """Plans given in memory: tests, and anything that builds Plans itself."""

    def __init__(self, plans: Sequence[plan.Plan]) -> None:
        self.plans = list(plans)
        self.event = asyncio.Event()
        self.description = "plans in memory"

    def load(self) -> list[plan.Plan]:
        self.event.clear()
        return list(self.plans)

    def set(self, plans: Sequence[plan.Plan]) -> None:
        """Replace the Plans; the runtime applies them on its next look."""
        self.plans = list(plans)
        self.event.set()

    async def changed(self) -> None:
        await self.event.wait()


class FileSource(PlanSource):
    """Files polled for change; subclasses turn their bytes into Plans."""

    def __init__(self, paths: Sequence[str], poll_seconds: float = POLL_SECONDS) -> None:
        self.paths = [str(path) for path in paths]
        self.poll_seconds = poll_seconds
        self.description = ", ".join(self.paths)
        self._stat: tuple[tuple[int, int, int] | None, ...] | None = None
        self._digest: bytes | None = None

    def _stats(self) -> tuple[tuple[int, int, int] | None, ...]:
        stats: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                info = os.stat(path)
            except OSError:
                stats.append(None)
            else:
                stats.append((info.st_mtime_ns, info.st_size, info.st_ino))
        return tuple(stats)

    def _read(self) -> tuple[list[tuple[str, bytes | None]], bytes]:
        contents: list[tuple[str, bytes | None]] = []
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                data: bytes | None = Path(path).read_bytes()
            except OSError:
                data = None
            contents.append((path, data))
            digest.update(b"\0missing" if data is None else hashlib.sha256(data).digest())
        return contents, digest.digest()

    def load(self) -> list[plan.Plan]:
        self._stat = self._stats()
        contents, self._digest = self._read()
        return self.parse(contents)

    @abc.abstractmethod
    def parse(self, contents: list[tuple[str, bytes | None]]) -> list[plan.Plan]:
        """Plans from each file's bytes (None: the file cannot be read)."""

    async def changed(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            stats = self._stats()
            if stats == self._stat:
                continue
            self._stat = stats
            _, digest = self._read()
            if digest != self._digest:
                return


class PlanFile(FileSource):
    """A Plan JSON file as `layerlb render --format dataplane` writes it: one Plan, several in a row, or a list."""

    def parse(self, contents: list[tuple[str, bytes | None]]) -> list[plan.Plan]:
        plans: list[plan.Plan] = []
        errors: list[str] = []
        for path, data in contents:
            if data is None:
                errors.append(f"{path}: -: cannot read the file")
                continue
            try:
                plans += parse_plans(path, data, allow_empty=False)
            except InvalidConfig as error:
                errors += error.lines
        errors = errors or _duplicates(self.description, plans)
        if errors:
            raise InvalidConfig(errors)
        return plans


def parse_plans(where: str, data: bytes | str, *, allow_empty: bool) -> list[plan.Plan]:
    """The Plans of one Plan JSON text (one Plan, several in a row, or a list); `InvalidConfig` names
    `where` and each bad field. `allow_empty`: `[]` means "serve nothing" rather than a mistake."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        objects = _json_values(text)
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidConfig([f"{where}: -: not Plan JSON: {error}"]) from None
    except RecursionError:  # json's decoder recurses per nesting level: a hostile text ends the stack
        raise InvalidConfig([f"{where}: -: not Plan JSON: nested too deeply"]) from None
    errors: list[str] = []
    if not objects and not allow_empty:
        errors.append(f"{where}: -: no Plan in the file")
    plans: list[plan.Plan] = []
    for index, obj in enumerate(objects):
        name = _plan_name(obj, index)
        try:
            plans.append(plan.Plan.model_validate(obj))
        except pydantic.ValidationError as error:
            for problem in error.errors():
                location = ".".join(str(part) for part in problem["loc"]) or "-"
                errors.append(f"{where}: {name}: {location}: {problem['msg']}")
    errors += _duplicates(where, plans)
    if errors:
        raise InvalidConfig(errors)
    return plans


def _duplicates(where: str, plans: Sequence[plan.Plan]) -> list[str]:
    keys = [p.key for p in plans]
    return [f"{where}: Plan {key} appears more than once" for key in sorted(set(keys)) if keys.count(key) > 1]


def _json_values(text: str) -> list[Any]:
    """Every JSON value of a text of concatenated values; a top-level list counts as its items."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            break
        value, index = decoder.raw_decode(text, index)
        values.extend(value if isinstance(value, list) else [value])
    return values


def _plan_name(obj: Any, index: int) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        return f"Plan/{obj.get('namespace', 'default')}/{obj['name']}"
    return f"Plan[{index}]"

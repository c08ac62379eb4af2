"""Reading resources from multi-document YAML files, for the CLI and `layerlb serve`.

Every failure becomes an error line (`FILE: KIND/NAME: path: reason`), never a traceback. TLS Secrets in
the same files are kept aside: they are the certificates of standalone HTTPS listeners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from layerlb import api, plan, resolve, validation


@dataclass(frozen=True)
class Loaded:
    """One document of a file: its display name, and either the parsed resource or its problems."""

    file: str
    name: str
    resource: api.Model | None = None
    problems: tuple[validation.Problem, ...] = ()
    secret: dict[str, Any] | None = None

    def error_lines(self) -> list[str]:
        """`FILE: KIND/NAME: path: reason`, one per problem."""
        return [f"{self.file}: {self.name}: {problem}" for problem in self.problems]


@dataclass
class Bundle:
    """Everything read from a set of files."""

    items: list[Loaded] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not item.problems for item in self.items)

    def view(self) -> resolve.StaticView:
        """The standalone view: Secrets found in these files by namespace and name."""
        secrets = {}
        for item in self.items:
            if item.secret is not None:
                metadata = item.secret.get("metadata") or {}
                secrets[(metadata.get("namespace") or "default", str(metadata.get("name")))] = item.secret
        return resolve.StaticView(secrets=secrets)

    def load_balancers(self) -> list[tuple[Loaded, api.LoadBalancer]]:
        return [(item, item.resource) for item in self.items if isinstance(item.resource, api.LoadBalancer)]


def _is_secret(document: dict[str, Any]) -> bool:
    return document.get("kind") == "Secret" and document.get("apiVersion") == "v1"


def load_file(path: str) -> list[Loaded]:
    """Parse and validate every document of one file (`-` is standard input)."""
    import sys

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return [Loaded(path, "-", problems=(validation.Problem("", f"cannot read the file: {reason}"),))]
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        return [Loaded(path, "-", problems=(validation.Problem("", f"not valid YAML{where}: {problem}"),))]
    if not documents:
        return [Loaded(path, "-", problems=(validation.Problem("", "no resources in the file"),))]
    loaded = []
    for document in documents:
        name = validation.name_of(document)
        if isinstance(document, dict) and _is_secret(document):
            # A Secret is TLS material for standalone HTTPS listeners: check it holds a PEM pair.
            try:
                resolve.certificate_from_secret(document, "data")
            except resolve.Unresolvable as error:
                loaded.append(Loaded(path, name, problems=tuple(error.problems)))
            else:
                loaded.append(Loaded(path, name, secret=document))
            continue
        try:
            loaded.append(Loaded(path, name, resource=validation.validate(document)))
        except validation.Invalid as error:
            loaded.append(Loaded(path, name, problems=tuple(error.problems)))
    return loaded


def load(paths: list[str]) -> Bundle:
    """Parse and validate every document of every file."""
    bundle = Bundle()
    for path in paths:
        bundle.items.extend(load_file(path))
    return bundle


def plans(bundle: Bundle) -> tuple[list[tuple[Loaded, plan.Plan]], list[str]]:
    """Resolve every valid LoadBalancer of a bundle standalone; error lines for those that cannot be."""
    view = bundle.view()
    resolved: list[tuple[Loaded, plan.Plan]] = []
    errors: list[str] = []
    for item, resource in bundle.load_balancers():
        try:
            resolved.append((item, resolve.resolve(resource, view)))
        except resolve.Unresolvable as error:
            errors.extend(f"{item.file}: {item.name}: {problem}" for problem in error.problems)
    return resolved, errors

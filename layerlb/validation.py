"""One validation path for every caller: a raw resource in, a typed model or a list of `Problem`s out.

The CLI, the operator and the tests all call `validate`; messages name the field path, the offending
value and what would be valid, and never carry a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pydantic

from layerlb import api, rules


@dataclass(frozen=True)
class Problem:
    """One reason a resource is refused: where (a field path such as `spec.listeners[0].port`) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class Invalid(Exception):
    """A resource was refused; carries every problem found, not only the first."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(problem) for problem in problems))
        self.problems = problems


def path_of(location: tuple[int | str, ...]) -> str:
    """Render a pydantic location as a Kubernetes field path: `spec.backends[0].name`."""
    text = ""
    for index, part in enumerate(location):
        if part == "[key]":
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        elif location[index + 1 : index + 2] == ("[key]",):
            text += f"[{part}]"  # a map key: Kubernetes writes `headers[X-Name]`
        else:
            text += f".{part}" if text else part
    return text


PATTERNS = {
    api.DNS_LABEL: "a DNS label (lower-case letters, digits and '-', at most 63, alphanumeric at both ends)",
    api.DNS_SUBDOMAIN: "a DNS name (lower-case DNS labels joined by '.')",
    api.HOST: "a host name (lower case, optionally *. first and :port last)",
    api.HEADER_NAME: "an HTTP header or cookie name (letters, digits and !#$%&'*+.^_`|~-)",
    api.HTTP_PATH: "an HTTP path (starting with /, no spaces, no ? or #)",
    api.INTERFACE_NAME: "an interface name (at most 15 letters, digits, '_', '.' and '-', not starting with '.' or '-')",
    api.LABEL_KEY: "a label key (an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' and '.', alphanumeric at both ends)",
    api.LABEL_VALUE: "a label value (empty, or at most 63 letters, digits, '-', '_' and '.', alphanumeric at both ends)",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _valid_fields(model: type[pydantic.BaseModel] | None) -> str:
    return ", ".join(model.model_fields) if model is not None else ""


def _model_at(
    model: type[pydantic.BaseModel], location: tuple[int | str, ...]
) -> type[pydantic.BaseModel] | None:
    """The model class that owns the last part of `location`, to list its valid field names."""
    current: Any = model
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, pydantic.BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, pydantic.BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Strip Optional and list[...] from an annotation, down to a model class when there is one."""
    for argument in getattr(annotation, "__args__", ()) or ():
        found = _unwrap(argument)
        if isinstance(found, type) and issubclass(found, pydantic.BaseModel):
            return found
    return annotation


def _message(error: Any, model: type[pydantic.BaseModel]) -> str:
    """Say a pydantic error the way a person reading a YAML file needs it."""
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        owner = _model_at(model, tuple(error["loc"]))
        return f"unknown field; valid fields: {_valid_fields(owner)}"
    if kind in ("enum", "literal_error"):
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"unsupported value {_short(value)}; valid: {expected}"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern"))
        return f"{_short(value)} is not {PATTERNS.get(pattern, f'a match of {pattern}')}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bounds = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}
        limit = next(iter(ctx.values()))
        return f"{_short(value)} is out of range; must be {bounds[kind]} {limit}"
    if kind in ("too_short", "string_too_short"):
        if kind == "string_too_short":
            return f"{_short(value)} is too short; at least {ctx.get('min_length')} characters"
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind in ("too_long", "string_too_long"):
        if kind == "string_too_long":
            return f"is too long; at most {ctx.get('max_length')} characters"
        return f"has too many items; at most {ctx.get('max_length')}"
    if kind == "int_from_float":
        return f"expected an integer, got {_short(value)}"
    if kind == "finite_number":
        return f"expected a finite number, got {_short(value)}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        wanted = kind.split("_")[0]
        names = {
            "int": "an integer",
            "float": "a number",
            "string": "a string",
            "bool": "true or false",
            "list": "a list",
            "dict": "a mapping",
            "model": "a mapping",
        }
        return f"expected {names.get(wanted, wanted)}, got {_short(value)}"
    return str(error["msg"]).removeprefix("Value error, ")


def _walk(node: Any, parts: list[str], path: str) -> Iterator[tuple[str, Any]]:
    """Yield (path, value) for every place a rule scope such as `spec.backends[*].healthCheck` names."""
    if node is None:
        return
    if not parts:
        yield path, node
        return
    head, rest = parts[0], parts[1:]
    every = head.endswith("[*]")
    name = head.removesuffix("[*]")
    child = getattr(node, name, None) if isinstance(node, pydantic.BaseModel) else None
    child_path = f"{path}.{name}" if path else name
    if child is None:
        return
    if every:
        for index, item in enumerate(child):
            yield from _walk(item, rest, f"{child_path}[{index}]")
    else:
        yield from _walk(child, rest, child_path)


def check_rules(resource: api.Model, kind: str) -> list[Problem]:
    """Run the cross-field rules of `kind` against a parsed resource."""
    problems = []
    for rule in rules.rules_for(kind):
        for path, value in _walk(resource, rule.scope.split("."), ""):
            message = rule.check(value)
            if message is not None:
                problems.append(Problem(path + rule.field, message))
    return problems


def validate(document: Any) -> api.Model:
    """Parse and check one resource (a decoded YAML mapping); raise `Invalid` with every problem."""
    if not isinstance(document, dict):
        raise Invalid(
            [Problem("", f"expected a Kubernetes resource (a mapping), got {type(document).__name__}")]
        )
    kind = document.get("kind")
    api_version = document.get("apiVersion")
    if not isinstance(kind, str) or kind not in api.KINDS:
        raise Invalid([Problem("kind", f"unsupported kind {_short(kind)}; valid: {', '.join(api.KINDS)}")])
    if api_version != api.API_VERSION:
        raise Invalid(
            [Problem("apiVersion", f"unsupported apiVersion {_short(api_version)}; valid: {api.API_VERSION}")]
        )
    model = api.KINDS[kind]
    try:
        resource = model.model_validate(document)
    except pydantic.ValidationError as error:
        problems = [Problem(path_of(tuple(e["loc"])), _message(e, model)) for e in error.errors()]
        raise Invalid(_dedupe(problems)) from None
    problems = check_rules(resource, kind)
    if problems:
        raise Invalid(problems)
    return resource


def _dedupe(problems: list[Problem]) -> list[Problem]:
    # pydantic reports each failed branch of an Optional union; one line per path and message is enough.
    seen: dict[tuple[str, str], Problem] = {}
    for problem in problems:
        seen.setdefault(
            (re.sub(r"\.(function-after|list|constrained-str)\[.*?\]", "", problem.path), problem.message),
            problem,
        )
    return list(seen.values())


def name_of(document: Any) -> str:
    """`KIND/NAME` of a raw document, as far as it can be told, for error lines."""
    if not isinstance(document, dict):
        return "?/?"
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"{document.get('kind') or '?'}/{name or '?'}"

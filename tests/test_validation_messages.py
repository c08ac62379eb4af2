"""What a refusal says, at the edges the validation module's mutation run showed untested: map keys in field
paths at any depth, long values cut to 60 characters, and the wording of each kind of length and type error."""

from __future__ import annotations

from typing import Any

import pytest

from layerlb import api, validation


@pytest.mark.parametrize(
    ("location", "path"),
    [
        (("metadata", "labels", "app", "[key]"), "metadata.labels[app]"),
        (("spec", "selector", "app", "[key]"), "spec.selector[app]"),
        (
            ("spec", "routes", 0, "match", "headers", "X-Name", "[key]"),
            "spec.routes[0].match.headers[X-Name]",
        ),
        (("spec", "routes", 10, "match", "headers", "X-Name"), "spec.routes[10].match.headers.X-Name"),
        (("spec", "backends", 3, "name"), "spec.backends[3].name"),
    ],
)
def test_field_paths_write_map_keys_in_brackets(location: tuple[int | str, ...], path: str) -> None:
    assert validation.path_of(location) == path


def message(kind: str, value: Any = None, **ctx: Any) -> str:
    return validation._message({"type": kind, "input": value, "ctx": ctx, "loc": ("spec",)}, api.LoadBalancer)


def test_long_values_are_cut_to_sixty_characters() -> None:
    fits = "x" * 58  # its repr, quotes included, is 60 characters
    assert message("int_from_float", fits) == f"expected an integer, got {fits!r}"
    longer = "x" * 59
    assert message("int_from_float", longer) == f"expected an integer, got {repr(longer)[:57]}..."


@pytest.mark.parametrize(
    ("kind", "value", "ctx", "text"),
    [
        ("string_too_short", "", {"min_length": 1}, "'' is too short; at least 1 characters"),
        ("too_short", [], {"min_length": 1}, "needs at least 1 item(s)"),
        ("string_too_long", "x" * 70, {"max_length": 63}, "is too long; at most 63 characters"),
        ("too_long", [1, 2, 3], {"max_length": 2}, "has too many items; at most 2"),
        ("int_from_float", 1.5, {}, "expected an integer, got 1.5"),
    ],
)
def test_each_length_and_type_error_has_its_own_words(
    kind: str, value: Any, ctx: dict[str, Any], text: str
) -> None:
    assert message(kind, value, **ctx) == text


def lb(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "L7",
        "architecture": "proxy",
        "vip": "127.0.0.10",
        "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
        "backends": [{"name": "app", "endpoints": [{"address": "127.0.0.1", "port": 9001}]}],
        "defaultBackend": "app",
    }
    return {
        "apiVersion": "layerlb.dev/v1alpha1",
        "kind": "LoadBalancer",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {**base, **spec},
    }


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            {"listeners": [{"name": "http", "port": 8080.5, "protocol": "HTTP"}]},
            "spec.listeners[0].port: expected an integer, got 8080.5",
        ),
        (
            {"backends": [{"name": "app", "endpoints": [{"address": "1" * 46, "port": 9001}]}]},
            "spec.backends[0].endpoints[0].address: is too long; at most 45 characters",
        ),
        (
            {"backends": [{"name": "app", "endpoints": [{"address": "1", "port": 9001}]}]},
            "spec.backends[0].endpoints[0].address: '1' is too short; at least 2 characters",
        ),
    ],
)
def test_real_pydantic_errors_get_the_same_words(spec: dict[str, Any], problem: str) -> None:
    """pydantic's error kinds are strings made at run time, not literals: compared by value, they still match."""
    with pytest.raises(validation.Invalid) as caught:
        validation.validate(lb(**spec))
    assert problem in [str(p) for p in caught.value.problems]


def test_a_map_key_right_after_the_root() -> None:
    assert validation.path_of(("labels", "app", "[key]")) == "labels[app]"


@pytest.mark.parametrize("version", ["layerlb.dev/v2", "layerlb.dev/v1", "layerlb.dev/v1alpha0", "v1"])
def test_any_other_api_version_is_refused_whichever_way_it_sorts(version: str) -> None:
    document = lb()
    document["apiVersion"] = version
    with pytest.raises(validation.Invalid) as caught:
        validation.validate(document)
    assert [str(p) for p in caught.value.problems] == [
        f"apiVersion: unsupported apiVersion {version!r}; valid: {api.API_VERSION}"
    ]

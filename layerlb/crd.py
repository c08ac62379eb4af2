"""CustomResourceDefinitions generated from the API models and the CEL rules: the single source of `crds/`.

pydantic emits JSON Schema 2020-12; Kubernetes wants a structural OpenAPI v3.0 schema (no `$ref`, no
`anyOf` for optional fields, boolean `exclusiveMinimum`), so the schema is rewritten here and the CEL
rules of `layerlb.rules` are attached at their scopes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from layerlb import api, rules

_DROP = {"title", "propertyNames", "discriminator"}


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline `$ref`s, collapse `Optional` unions and translate keywords to OpenAPI v3.0."""
    if "$ref" in schema:
        target = _resolve(defs[schema["$ref"].split("/")[-1]], defs)
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        return {**target, **_resolve(extra, defs)} if extra else target
    if "allOf" in schema and len(schema["allOf"]) == 1:
        inner = _resolve(schema["allOf"][0], defs)
        extra = {k: v for k, v in schema.items() if k != "allOf"}
        return {**inner, **_resolve(extra, defs)}
    if "anyOf" in schema:
        variants = [v for v in schema["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {schema}")
        inner = _resolve(variants[0], defs)
        extra = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
        return {**inner, **_resolve(extra, defs)}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        elif key == "patternProperties":
            # Structural schemas have no patternProperties: keep the value schema; the key pattern is
            # checked by layerlb's validation only.
            (out["additionalProperties"],) = (_resolve(sub, defs) for sub in value.values())
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _resolve(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "properties" in out:
        out["type"] = "object"
        out.pop("additionalProperties", None)
    return out


def _strip_status_defaults(schema: dict[str, Any]) -> None:
    # The operator owns status; defaults there would only make the API server invent values.
    schema.pop("default", None)
    for sub in schema.get("properties", {}).values():
        _strip_status_defaults(sub)
    if isinstance(schema.get("items"), dict):
        _strip_status_defaults(schema["items"])


def _at(schema: dict[str, Any], scope: str) -> dict[str, Any]:
    """The sub-schema at a rule scope such as `spec.backends[*].healthCheck`."""
    node = schema
    for part in scope.split("."):
        node = node["properties"][part.removesuffix("[*]")]
        if part.endswith("[*]"):
            node = node["items"]
    return node


def _attach_rules(schema: dict[str, Any], kind: str) -> None:
    for rule in rules.rules_for(kind):
        if not rule.cel:
            continue
        entry: dict[str, Any] = {"rule": rule.cel, "messageExpression": rule.message}
        if rule.field:
            entry["fieldPath"] = rule.field
        _at(schema, rule.scope).setdefault("x-kubernetes-validations", []).append(entry)


def _structural(model: type[api.Model]) -> dict[str, Any]:
    raw = model.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    return _resolve(raw, defs)


_LIST_MAP_KEYS = {"conditions": "type", "nodes": "node"}


def _optional_model(annotation: Any) -> type[api.Model]:
    """The model of a field annotated `Model` or `Model | None`."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, api.Model):
            return candidate
    raise TypeError(f"not a model: {annotation}")


def open_api_schema(model: type[api.Model], kind: str) -> dict[str, Any]:
    """The `openAPIV3Schema` of one kind."""
    spec = _structural(_optional_model(model.model_fields["spec"].annotation))
    properties: dict[str, Any] = {
        "apiVersion": {
            "type": "string",
            "description": f"The versioned schema of this object: {api.API_VERSION}.",
        },
        "kind": {"type": "string", "description": f"The kind of this object: {kind}."},
        # The API server allows nothing but the type here (not even a description): metadata is its own.
        "metadata": {"type": "object"},
        "spec": spec,
    }
    if "status" in model.model_fields:
        status_model = model.model_fields["status"].annotation
        status = _structural(_optional_model(status_model))
        _strip_status_defaults(status)
        # Lists of entries keyed by a field: under server-side apply each writer owns its own entries (the
        # operator its condition types, each node's speaker its `nodes` entry), so none drops another's.
        for field_name, key in _LIST_MAP_KEYS.items():
            if field_name in status["properties"]:
                status["properties"][field_name]["x-kubernetes-list-type"] = "map"
                status["properties"][field_name]["x-kubernetes-list-map-keys"] = [key]
        properties["status"] = status
    schema = {
        "type": "object",
        "description": (model.__doc__ or "").strip(),
        "properties": properties,
        "required": ["spec"],
    }
    _attach_rules(schema, kind)
    return schema


_LB_COLUMNS = [
    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
    {"name": "Architecture", "type": "string", "jsonPath": ".spec.architecture"},
    {"name": "VIP", "type": "string", "jsonPath": ".status.vip"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Announced By", "type": "string", "jsonPath": ".status.announcement.node"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
_POOL_COLUMNS = [
    {"name": "Addresses", "type": "string", "jsonPath": ".spec.addresses"},
    {"name": "AutoAssign", "type": "boolean", "jsonPath": ".spec.autoAssign"},
    {
        "name": "Interfaces Found",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="InterfacesFound")].status',
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


_PEER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Peer", "type": "string", "jsonPath": ".spec.peerAddress"},
    {"name": "Peer ASN", "type": "integer", "jsonPath": ".spec.peerASN"},
    {"name": "Local ASN", "type": "integer", "jsonPath": ".spec.localASN"},
    # `bfd` present means on; its transmit interval says so and how fast (empty: off).
    {"name": "BFD ms", "type": "integer", "jsonPath": ".spec.bfd.transmitInterval"},
    # A column shows one value (JSONPath cannot count the nodes' entries): the operator's aggregate, and in
    # `-o wide` its message ("2/3 nodes Established").
    {
        "name": "Established",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Established")].status',
    },
    {
        "name": "Sessions",
        "type": "string",
        "priority": 1,
        "jsonPath": '.status.conditions[?(@.type=="Established")].message',
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
_ADVERTISEMENT_COLUMNS = [
    {"name": "Pools", "type": "string", "jsonPath": ".spec.vipPools"},
    {"name": "Peers", "type": "string", "jsonPath": ".spec.peers"},
    {"name": "Communities", "type": "string", "jsonPath": ".spec.communities"},
    {"name": "Local Pref", "type": "integer", "jsonPath": ".spec.localPreference"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


@dataclass(frozen=True)
class _Names:
    """How the API server names and shows a kind."""

    plural: str
    namespaced: bool
    short_name: str
    columns: list[dict[str, Any]]


_NAMES = {
    "LoadBalancer": _Names("loadbalancers", True, "llb", _LB_COLUMNS),
    "VIPPool": _Names("vippools", False, "vipp", _POOL_COLUMNS),
    "BGPPeer": _Names("bgppeers", False, "llbpeer", _PEER_COLUMNS),
    "BGPAdvertisement": _Names("bgpadvertisements", False, "llbadv", _ADVERTISEMENT_COLUMNS),
}


def definition(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind of `api.KINDS`."""
    names = _NAMES[kind]
    model = api.KINDS[kind]
    version: dict[str, Any] = {
        "name": api.VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": open_api_schema(model, kind)},
        "additionalPrinterColumns": names.columns,
    }
    if "status" in model.model_fields:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names.plural}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced" if names.namespaced else "Cluster",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": names.plural,
                "singular": kind.lower(),
                "shortNames": [names.short_name],
                "categories": ["layerlb"],
            },
            "versions": [version],
        },
    }


def files() -> dict[str, str]:
    """The contents of `crds/`: file name → YAML text."""
    return {f"{api.GROUP}_{_NAMES[kind].plural}.yaml": render(kind) for kind in api.KINDS}


def render(kind: str) -> str:
    """One CRD as YAML, stable across runs so that a stale `crds/` shows as a diff."""
    header = "# Generated by `layerlb crd` from layerlb/api.py and layerlb/rules.py; do not edit.\n"
    return header + yaml.safe_dump(definition(kind), sort_keys=False, width=120)


def render_all() -> str:
    """Every CRD, as one multi-document YAML stream."""
    return "---\n".join(render(kind) for kind in api.KINDS)

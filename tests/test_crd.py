"""The CRDs in `crds/` are generated from the models and rules, and say what the API server must enforce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from layerlb import api, crd, rules

ROOT = Path(__file__).resolve().parent.parent


def _schema(kind: str) -> dict[str, Any]:
    definition = crd.definition(kind)
    schema: dict[str, Any] = definition["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_crds_match_the_models() -> None:
    for name, text in crd.files().items():
        committed = ROOT / "crds" / name
        assert committed.exists(), f"crds/{name} is missing; run `layerlb crd --write crds`"
        assert committed.read_text(encoding="utf-8") == text, (
            f"crds/{name} is stale; run `layerlb crd --write crds`"
        )
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(crd.files())


def test_crd_printout_is_the_committed_files() -> None:
    documents = list(yaml.safe_load_all(crd.render_all()))
    assert [d["spec"]["names"]["kind"] for d in documents] == [
        "LoadBalancer",
        "VIPPool",
        "BGPPeer",
        "BGPAdvertisement",
    ]


def test_loadbalancer_is_namespaced_with_short_name_status_and_columns() -> None:
    definition = crd.definition("LoadBalancer")
    assert definition["metadata"]["name"] == "loadbalancers.layerlb.dev"
    assert definition["spec"]["scope"] == "Namespaced"
    assert definition["spec"]["names"]["shortNames"] == ["llb"]
    version = definition["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Mode",
        "Architecture",
        "VIP",
        "Ready",
        "Announced By",
        "Age",
    ]
    assert version["additionalPrinterColumns"][4]["jsonPath"] == ".status.announcement.node"


def test_a_vippool_has_a_status_whose_node_entries_and_conditions_are_keyed_lists() -> None:
    """Each speaker owns its node's entry and the operator its condition types under server-side apply:
    that needs list-maps keyed by `node` and `type`, on a status subresource."""
    version = crd.definition("VIPPool")["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    status = _schema("VIPPool")["properties"]["status"]["properties"]
    assert status["nodes"]["x-kubernetes-list-type"] == "map"
    assert status["nodes"]["x-kubernetes-list-map-keys"] == ["node"]
    assert set(status["nodes"]["items"]["properties"]) == {"node", "missingInterfaces", "observedGeneration"}
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Interfaces Found"] == '.status.conditions[?(@.type=="InterfacesFound")].status'


def test_the_speakers_announcement_is_part_of_the_status_schema() -> None:
    announced = _schema("LoadBalancer")["properties"]["status"]["properties"]["announcement"]
    assert announced["type"] == "object"
    assert set(announced["properties"]) == {"address", "node", "nodes", "interfaces", "protocol", "since"}
    assert announced["properties"]["protocol"]["enum"] == ["L2", "BGP"]  # BGP: a pool with l2 false
    assert "default" not in announced["properties"]["protocol"]  # status carries no defaults


def test_vippool_and_the_bgp_kinds_are_cluster_scoped() -> None:
    for kind, plural in (
        ("VIPPool", "vippools"),
        ("BGPPeer", "bgppeers"),
        ("BGPAdvertisement", "bgpadvertisements"),
    ):
        definition = crd.definition(kind)
        assert definition["spec"]["scope"] == "Cluster"
        assert definition["metadata"]["name"] == f"{plural}.layerlb.dev"
        assert definition["spec"]["names"]["categories"] == ["layerlb"]


def test_a_bgppeer_status_has_one_entry_per_node_and_operator_conditions_as_keyed_lists() -> None:
    """Each speaker server-side applies its node's session entry, the operator its condition types."""
    version = crd.definition("BGPPeer")["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    status = _schema("BGPPeer")["properties"]["status"]["properties"]
    assert status["nodes"]["x-kubernetes-list-type"] == "map"
    assert status["nodes"]["x-kubernetes-list-map-keys"] == ["node"]
    entry = status["nodes"]["items"]
    assert set(entry["properties"]) == {
        "node",
        "state",
        "since",
        "lastError",
        "prefixesAdvertised",
        "bfd",
        "observedGeneration",
    }
    assert entry["required"] == ["node", "state"]
    assert entry["properties"]["state"]["enum"] == [
        "Idle",
        "Connect",
        "Active",
        "OpenSent",
        "OpenConfirm",
        "Established",
    ]
    assert entry["properties"]["bfd"]["enum"] == ["AdminDown", "Down", "Init", "Up"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_bgppeer_printer_columns_show_the_session_and_how_many_nodes_have_it_established() -> None:
    version = crd.definition("BGPPeer")["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Peer": ".spec.peerAddress",
        "Peer ASN": ".spec.peerASN",
        "Local ASN": ".spec.localASN",
        "BFD ms": ".spec.bfd.transmitInterval",
        "Established": '.status.conditions[?(@.type=="Established")].status',
        "Sessions": '.status.conditions[?(@.type=="Established")].message',
        "Age": ".metadata.creationTimestamp",
    }
    assert [c.get("priority", 0) for c in version["additionalPrinterColumns"]] == [0, 0, 0, 0, 0, 1, 0]


def test_a_bgpadvertisement_has_no_status() -> None:
    version = crd.definition("BGPAdvertisement")["spec"]["versions"][0]
    assert "subresources" not in version
    assert "status" not in _schema("BGPAdvertisement")["properties"]


def test_bgp_schemas_carry_ranges_and_defaults() -> None:
    peer = _schema("BGPPeer")["properties"]["spec"]
    assert peer["required"] == ["peerAddress", "peerASN", "localASN"]
    props = peer["properties"]
    assert (props["peerASN"]["minimum"], props["peerASN"]["maximum"]) == (1, 4294967295)
    assert (props["peerPort"]["default"], props["holdTime"]["default"]) == (179, 90)
    assert "default" not in props["keepaliveTime"]  # holdTime / 3, which a schema default cannot say
    assert props["ebgpMultiHop"]["default"] is False
    assert props["passwordSecret"]["required"] == ["name", "namespace"]
    assert props["passwordSecret"]["properties"]["key"]["default"] == "password"
    assert "password" not in props  # a Secret reference, never a plaintext password
    bfd = props["bfd"]["properties"]
    assert [bfd[k]["default"] for k in ("receiveInterval", "transmitInterval", "detectMultiplier")] == [
        300,
        300,
        3,
    ]
    assert (bfd["detectMultiplier"]["minimum"], bfd["detectMultiplier"]["maximum"]) == (2, 255)
    advertisement = _schema("BGPAdvertisement")["properties"]["spec"]["properties"]
    assert (advertisement["aggregationLength"]["default"], advertisement["aggregationLength"]["maximum"]) == (
        32,
        32,
    )
    assert (
        advertisement["aggregationLengthV6"]["default"],
        advertisement["aggregationLengthV6"]["maximum"],
    ) == (
        128,
        128,
    )
    assert advertisement["localPreference"]["maximum"] == 4294967295
    announce = _schema("VIPPool")["properties"]["spec"]["properties"]["announce"]["properties"]
    assert (announce["l2"]["type"], announce["l2"]["default"]) == ("boolean", True)


def test_schema_carries_types_enums_required_and_defaults() -> None:
    spec = _schema("LoadBalancer")["properties"]["spec"]
    assert spec["required"] == ["mode", "architecture", "listeners", "backends"]
    assert spec["properties"]["mode"]["enum"] == ["L4", "L7"]
    assert spec["properties"]["replicas"] == {
        "default": 1,
        "description": "Forwarding pods for this VIP.",
        "maximum": 100,
        "minimum": 1,
        "type": "integer",
    }
    backend = spec["properties"]["backends"]["items"]
    assert backend["properties"]["algorithm"]["default"] == "round-robin"
    weight = backend["properties"]["endpoints"]["items"]["properties"]["weight"]
    assert (weight["minimum"], weight["maximum"], weight["default"]) == (0, api.MAX_WEIGHT, 1)
    timeouts = spec["properties"]["timeouts"]["properties"]
    assert timeouts["connectSeconds"]["exclusiveMinimum"] is True


def _walk(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found.extend(_walk(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_walk(value))
    return found


def test_schema_is_structural() -> None:
    for kind in api.KINDS:
        for node in _walk(_schema(kind)):
            for keyword in ("$ref", "anyOf", "allOf", "oneOf", "$defs", "const"):
                assert keyword not in node, (kind, keyword, node)
            assert not isinstance(node.get("title"), str), (kind, node)
            if "properties" in node:
                assert node.get("type") == "object"


def test_every_string_and_list_is_bounded_for_cel_cost() -> None:
    for kind in api.KINDS:
        for node in _walk(_schema(kind)["properties"]["spec"]):
            if node.get("type") == "string" and "enum" not in node:
                assert "maxLength" in node, (kind, node)
            if node.get("type") == "array":
                assert "maxItems" in node, (kind, node)


def test_every_cel_rule_lands_in_the_crd_at_its_scope() -> None:
    placed = [
        (kind, entry["rule"], entry.get("fieldPath", ""))
        for kind in api.KINDS
        for node in _walk(_schema(kind))
        for entry in node.get("x-kubernetes-validations", [])
    ]
    expected = [(rule.kind, rule.cel, rule.field) for rule in rules.RULES if rule.cel]
    assert sorted(placed) == sorted(expected)


def test_every_field_has_a_description() -> None:
    """`kubectl explain` has something to say about every field of every kind, status included.

    `metadata` is the exception: the API server refuses anything but its type (and documents it itself).
    """
    for kind in api.KINDS:
        schema = _schema(kind)
        assert schema["properties"]["metadata"] == {"type": "object"}
        for node in _walk(schema):
            for name, sub in node.get("properties", {}).items():
                assert sub.get("description") or sub is schema["properties"]["metadata"], (
                    f"{kind}: {name} has no description"
                )


def test_architecture_description_explains_each_architecture() -> None:
    text = _schema("LoadBalancer")["properties"]["spec"]["properties"]["architecture"]["description"]
    for word in ("nat", "dsr", "tunnel", "proxy", "transparent"):
        assert f" {word}:" in text

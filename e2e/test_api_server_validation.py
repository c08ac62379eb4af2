"""The API server, given layerlb's CRDs, accepts what layerlb accepts and refuses the rest with its messages.

Every cross-field rule lives twice (Python and CEL, `layerlb/rules.py`); this is where the two halves are
held to one message, against a real kube-apiserver.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from e2e.kube import ROOT, Kubectl
from layerlb import api, validation

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))


def _judged_by_api_server(path: Path) -> bool:
    return not re.search(r"^# apiserver: no\b", path.read_text(encoding="utf-8"), re.MULTILINE)


def _problems(document: Any) -> tuple[list[validation.Problem], bool]:
    """layerlb's problems with a document, and whether all of them come from CEL rules."""
    try:
        validation.validate(document)
    except validation.Invalid as error:
        model = api.KINDS[document["kind"]]
        try:
            model.model_validate(document)
        except pydantic.ValidationError:
            return error.problems, False
        return error.problems, True
    return [], False


@pytest.mark.usefixtures("crds_installed")
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_api_server_accepts_every_example(kubectl: Kubectl, example: Path) -> None:
    kubectl.ok("apply", "--dry-run=server", "-f", str(example))


@pytest.mark.usefixtures("crds_installed")
@pytest.mark.parametrize(
    "invalid", [p for p in INVALID if _judged_by_api_server(p)], ids=lambda p: p.name
)  # fmt: skip
def test_the_api_server_refuses_each_invalid_example_with_layerlbs_message(
    kubectl: Kubectl, invalid: Path
) -> None:
    documents = [d for d in yaml.safe_load_all(invalid.read_text(encoding="utf-8")) if d is not None]
    done = kubectl("apply", "--dry-run=server", "-f", str(invalid))
    assert done.returncode != 0, f"the API server accepted {invalid.name}"
    for document in documents:
        problems, from_rules = _problems(document)
        assert problems, f"{invalid.name}: layerlb accepts a document the test expected to be invalid"
        for problem in problems:
            # kubectl writes `spec.engine: Invalid value: "object": <message>` for CEL rules
            assert f"{problem.path}" in done.stderr, (
                f"{invalid.name}: no error at {problem.path}:\n{done.stderr}"
            )
            if from_rules:
                assert f"{problem.path}: Invalid value: " in done.stderr and problem.message in done.stderr, (
                    f"{invalid.name}: layerlb says\n  {problem}\nthe API server says\n  {done.stderr}"
                )


@pytest.mark.usefixtures("crds_installed")
def test_printer_columns_show_mode_architecture_vip_ready_announcer_age(kubectl: Kubectl) -> None:
    kubectl.ok("apply", "-f", str(ROOT / "examples" / "l7-proxy-routes.yaml"))
    header = kubectl.ok("get", "llb", "-n", "demo").splitlines()[0].split()
    assert header == ["NAME", "MODE", "ARCHITECTURE", "VIP", "READY", "ANNOUNCED", "BY", "AGE"]


@pytest.mark.usefixtures("crds_installed")
def test_kubectl_explain_says_what_each_architecture_means(kubectl: Kubectl) -> None:
    text = " ".join(kubectl.ok("explain", "loadbalancer.spec.architecture").split())
    for word in ("L4 nat:", "L4 dsr:", "L4 tunnel:", "L4 proxy:", "L7 proxy:", "L7 transparent:"):
        assert word in text


@pytest.mark.usefixtures("crds_installed")
def test_defaults_are_applied_by_the_api_server(kubectl: Kubectl) -> None:
    kubectl.ok("apply", "-f", str(ROOT / "examples" / "l4-proxy-tcp.yaml"))
    stored = yaml.safe_load(kubectl.ok("get", "llb", "-n", "demo", "-o", "yaml"))
    spec = next(item["spec"] for item in stored["items"] if item["spec"]["mode"] == "L4")
    assert spec["replicas"] >= 1
    assert all("algorithm" in backend for backend in spec["backends"])


@pytest.mark.usefixtures("crds_installed")
def test_bgp_kinds_are_listed_with_their_session_columns_and_api_server_defaults(kubectl: Kubectl) -> None:
    kubectl.ok("apply", "-f", str(ROOT / "examples" / "bgp.yaml"))
    header, *rows = kubectl.ok("get", "llbpeer").splitlines()
    assert header.split() == [
        "NAME",
        "PEER",
        "PEER",
        "ASN",
        "LOCAL",
        "ASN",
        "BFD",
        "MS",
        "ESTABLISHED",
        "AGE",
    ]
    cells = {row.split()[0]: row.split()[1:5] for row in rows}
    assert cells["tor-a"] == ["192.0.2.1", "64512", "64513", "300"]
    assert cells["rr"][:3] == ["198.51.100.1", "64513", "64513"]
    peer = yaml.safe_load(kubectl.ok("get", "bgppeer", "tor-a", "-o", "yaml"))["spec"]
    assert (peer["peerPort"], peer["holdTime"], peer["ebgpMultiHop"]) == (179, 90, False)
    assert peer["passwordSecret"]["key"] == "password"
    assert "keepaliveTime" not in peer  # holdTime / 3, left to the speaker
    advertisement = yaml.safe_load(kubectl.ok("get", "bgpadvertisement", "edge", "-o", "yaml"))["spec"]
    assert (advertisement["aggregationLength"], advertisement["aggregationLengthV6"]) == (32, 128)
    columns = kubectl.ok("get", "llbadv").splitlines()[0].split()
    assert columns == ["NAME", "POOLS", "PEERS", "COMMUNITIES", "LOCAL", "PREF", "AGE"]


@pytest.mark.usefixtures("crds_installed")
def test_each_nodes_speaker_applies_its_own_bgp_session_entry_without_dropping_the_others(
    kubectl: Kubectl,
) -> None:
    kubectl.ok("apply", "-f", str(ROOT / "examples" / "bgp.yaml"))
    for node, state in (("node-1", "Established"), ("node-2", "Active"), ("node-3", "Established")):
        entry = {"node": node, "state": state, "prefixesAdvertised": 2, "bfd": "Up", "observedGeneration": 1}
        if state != "Established":
            entry["lastError"] = "Hold Timer Expired"
        patch = {
            "apiVersion": api.API_VERSION,
            "kind": "BGPPeer",
            "metadata": {"name": "tor-a"},
            "status": {"nodes": [entry]},
        }
        kubectl.ok(
            "apply", "--server-side", "--subresource=status", f"--field-manager=layerlb-speaker-{node}",
            "-f", "-", stdin=yaml.safe_dump(patch),
        )  # fmt: skip
    status = yaml.safe_load(kubectl.ok("get", "bgppeer", "tor-a", "-o", "yaml"))["status"]
    assert [(entry["node"], entry["state"]) for entry in status["nodes"]] == [
        ("node-1", "Established"),
        ("node-2", "Active"),
        ("node-3", "Established"),
    ]
    condition = {
        "type": "Established",
        "status": "False",
        "reason": "SessionsDown",
        "message": "2/3 nodes Established",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }
    patch = {"apiVersion": api.API_VERSION, "kind": "BGPPeer", "metadata": {"name": "tor-a"},
             "status": {"conditions": [condition]}}  # fmt: skip
    kubectl.ok(
        "apply", "--server-side", "--subresource=status", "--field-manager=layerlb-operator",
        "-f", "-", stdin=yaml.safe_dump(patch),
    )  # fmt: skip
    status = yaml.safe_load(kubectl.ok("get", "bgppeer", "tor-a", "-o", "yaml"))["status"]
    assert len(status["nodes"]) == 3 and len(status["conditions"]) == 1
    header, row = kubectl.ok("get", "llbpeer", "tor-a", "-o", "wide").splitlines()
    assert header.split()[-3:] == ["ESTABLISHED", "SESSIONS", "AGE"]
    assert re.search(r"\bFalse\s+2/3 nodes Established\s", row), row
    bad = {"apiVersion": api.API_VERSION, "kind": "BGPPeer", "metadata": {"name": "tor-a"},
           "status": {"nodes": [{"node": "node-4", "state": "Up"}]}}  # fmt: skip
    done = kubectl(
        "apply", "--server-side", "--subresource=status", "--field-manager=layerlb-speaker-node-4",
        "-f", "-", stdin=yaml.safe_dump(bad),
    )  # fmt: skip
    assert done.returncode != 0 and 'status.nodes[3].state: Unsupported value: "Up"' in done.stderr


@pytest.mark.usefixtures("crds_installed")
@pytest.mark.parametrize(
    "spec",
    [
        {"holdTime": 0, "keepaliveTime": 30},  # the branches of keepaliveTime's message no example shows
        {"keepaliveTime": 0},
        {"routerID": "0.0.0.0"},
        {"peerAddress": "2001:db8::1", "sourceAddress": "192.0.2.10"},
    ],
    ids=["keepalive-with-hold-0", "keepalive-0", "router-id-zero", "source-ipv4-peer-ipv6"],
)
def test_the_api_server_gives_each_branch_of_a_bgppeer_message_as_layerlb_does(
    kubectl: Kubectl, spec: dict[str, Any]
) -> None:
    document = {
        "apiVersion": api.API_VERSION,
        "kind": "BGPPeer",
        "metadata": {"name": "branch"},
        "spec": {"peerAddress": "192.0.2.1", "peerASN": 64512, "localASN": 64513, **spec},
    }
    (problem,), from_rules = _problems(document)
    assert from_rules
    done = kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(document))
    assert done.returncode != 0
    assert f"{problem.path}: Invalid value: " in done.stderr and problem.message in done.stderr, (
        f"layerlb says\n  {problem}\nthe API server says\n  {done.stderr}"
    )

"""The examples users copy are valid and render standalone; the invalid ones fail with exactly their expected lines.

Every file in `examples/invalid/` starts with `# expect: KIND/NAME: path: reason` lines (the error lines
after `FILE: `), and together the invalid examples exercise every rule of `layerlb.rules.RULES`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from layerlb import api, cli, rules, validation

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (.+)$", re.MULTILINE)
NOT_FOR_API_SERVER = re.compile(r"^# apiserver: no\s*$", re.MULTILINE)

# (mode, architecture, engine) -> the example that shows it
MODE_ARCHITECTURE_FILES = {
    ("L4", "nat", "ipvs"): "l4-nat-ipvs.yaml",
    ("L4", "nat", "nftables"): "l4-nat-nftables.yaml",
    ("L4", "dsr", None): "l4-dsr.yaml",
    ("L4", "tunnel", None): "l4-tunnel.yaml",
    ("L4", "proxy", "TCP"): "l4-proxy-tcp.yaml",
    ("L4", "proxy", "UDP"): "l4-proxy-udp.yaml",
    ("L7", "proxy", "HTTP"): "l7-proxy-routes.yaml",
    ("L7", "proxy", "HTTPS"): "l7-https.yaml",
    ("L7", "transparent", None): "l7-transparent.yaml",
}


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return Run(code, captured.out, captured.err)


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _load_balancers(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in _documents(path) if isinstance(doc, dict) and doc.get("kind") == "LoadBalancer"]


def _expected(path: Path) -> set[str]:
    return set(EXPECT.findall(path.read_text(encoding="utf-8")))


def _without_prefix(path: Path, lines: str) -> set[str]:
    prefix = f"{path}: "
    result = set()
    for line in lines.splitlines():
        assert line.startswith(prefix), f"an error line without the file prefix {prefix!r}: {line!r}"
        result.add(line.removeprefix(prefix))
    return result


# --- the valid examples ------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(capsys: pytest.CaptureFixture[str], example: Path) -> None:
    run = _run(capsys, "validate", str(example))
    assert (run.code, run.err) == (0, "")
    lines = run.out.splitlines()
    assert lines, f"{example.name} prints nothing"
    assert all(line.startswith(f"{example}: ") and line.endswith(": ok") for line in lines), run.out


@pytest.mark.parametrize(
    "example", [p for p in EXAMPLES if _load_balancers(p)], ids=lambda p: p.name
)  # fmt: skip
def test_every_load_balancer_example_renders_to_dataplane_standalone(
    capsys: pytest.CaptureFixture[str], example: Path
) -> None:
    run = _run(capsys, "render", "--format", "dataplane", str(example))
    assert (run.code, run.err) == (0, "")
    rendered = json.loads(run.out)
    (document,) = _load_balancers(example)
    assert rendered["name"] == document["metadata"]["name"]
    assert rendered["namespace"] == "demo"
    assert rendered["vip"] == document["spec"]["vip"]
    assert all(backend["endpoints"] for backend in rendered["backends"])


def test_every_mode_and_architecture_has_its_example() -> None:
    shown = {}
    for example in EXAMPLES:
        for document in _load_balancers(example):
            spec = document["spec"]
            if spec["architecture"] in ("nat",):
                detail = spec.get("engine", "ipvs")
            elif spec["architecture"] == "proxy":
                detail = spec["listeners"][0]["protocol"]
            else:
                detail = None
            shown[(spec["mode"], spec["architecture"], detail)] = example.name
    assert shown == MODE_ARCHITECTURE_FILES
    for mode, architectures in api.ARCHITECTURES.items():
        for architecture in architectures:
            assert any(key[:2] == (mode, architecture) for key in shown), (
                f"no example of {mode} {architecture}"
            )


def test_every_example_uses_namespace_demo_and_static_endpoints() -> None:
    for example in EXAMPLES:
        for document in _load_balancers(example):
            assert document["metadata"]["namespace"] == "demo", example.name
            for backend in document["spec"]["backends"]:
                assert "service" not in backend and backend["endpoints"], f"{example.name}: {backend['name']}"


def test_proxy_examples_can_be_served_together_on_loopback_above_port_1024() -> None:
    bound: dict[tuple[str, int, str], str] = {}
    for example in EXAMPLES:
        for document in _load_balancers(example):
            spec = document["spec"]
            if spec["architecture"] not in ("proxy", "transparent"):
                continue
            assert ipaddress.ip_address(spec["vip"]).is_loopback, example.name
            for listener in spec["listeners"]:
                assert listener["port"] > 1024, f"{example.name}: {listener['name']}"
                transport = "UDP" if listener["protocol"] == "UDP" else "TCP"
                key = (spec["vip"], listener["port"], transport)
                assert key not in bound, f"{example.name} and {bound.get(key)} both bind {key}"
                bound[key] = example.name
            for backend in spec["backends"]:
                for endpoint in backend["endpoints"]:
                    assert endpoint["address"] == "127.0.0.1" and 9001 <= endpoint["port"] <= 9003


def test_the_https_example_carries_its_certificate_for_shop_example_com(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = ROOT / "examples" / "l7-https.yaml"
    secrets = [doc for doc in _documents(example) if doc.get("kind") == "Secret"]
    assert [(s["metadata"]["name"], s["metadata"]["namespace"], s["type"]) for s in secrets] == [
        ("shop-tls", "demo", "kubernetes.io/tls")
    ]
    run = _run(capsys, "render", str(example))
    assert run.code == 0, run.err
    (https,) = [listener for listener in json.loads(run.out)["listeners"] if listener["protocol"] == "HTTPS"]
    (certificate,) = https["certificates"]
    assert certificate["names"] == ["shop.example.com"]
    assert certificate["source"] == "Secret/shop-tls"


def test_the_vippool_example_has_a_cidr_and_a_range() -> None:
    (pool,) = _documents(ROOT / "examples" / "vippool.yaml")
    addresses = pool["spec"]["addresses"]
    assert any("/" in address for address in addresses)
    assert any("-" in address for address in addresses)
    assert all(api.address_block(address)[1] > 1 for address in addresses)


def test_the_readme_lists_every_example() -> None:
    readme = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    for example in EXAMPLES:
        assert f"[{example.name}]({example.name})" in readme


# --- the invalid examples ----------------------------------------------------------------------------


def test_there_are_at_least_24_invalid_examples_each_starting_with_its_expectation() -> None:
    assert len(INVALID) >= 24
    for invalid in INVALID:
        first = invalid.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# expect: "), f"{invalid.name} does not start with '# expect: '"


@pytest.mark.parametrize("invalid", INVALID, ids=[p.name for p in INVALID])
def test_invalid_example_fails_validate_with_exactly_its_expected_lines(
    capsys: pytest.CaptureFixture[str], invalid: Path
) -> None:
    run = _run(capsys, "validate", str(invalid))
    assert run.code == cli.EXIT_INVALID
    assert run.out == ""
    assert _without_prefix(invalid, run.err) == _expected(invalid)


@pytest.mark.parametrize("invalid", INVALID, ids=[p.name for p in INVALID])
def test_invalid_example_fails_render_with_the_same_lines(
    capsys: pytest.CaptureFixture[str], invalid: Path
) -> None:
    run = _run(capsys, "render", str(invalid))
    assert (run.code, run.out) == (cli.EXIT_INVALID, "")
    assert _without_prefix(invalid, run.err) == _expected(invalid)


def _rule_pattern(rule: rules.Rule) -> re.Pattern[str]:
    return re.compile(re.escape(rule.scope + rule.field).replace(r"\[\*\]", r"\[\d+\]"))


def _at(resource: Any, path: str) -> Any:
    """The value at a field path such as `spec.backends[0].healthCheck` of a parsed resource."""
    value = resource
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        value = value[int(index)] if index else getattr(value, name)
    return value


def _attributed(document: Any) -> Iterator[tuple[validation.Problem, rules.Rule | None]]:
    """Each problem `validate` finds in a document, with the rule that reports it (None: schema level)."""
    try:
        validation.validate(document)
    except validation.Invalid as error:
        problems = error.problems
    else:
        return
    kind = document.get("kind") if isinstance(document, dict) else None
    try:
        resource = api.KINDS[kind].model_validate(document) if kind in api.KINDS else None
    except pydantic.ValidationError:
        resource = None
    for problem in problems:
        found = None
        if resource is not None and document.get("apiVersion") == api.API_VERSION:
            for rule in rules.rules_for(str(kind)):
                if not _rule_pattern(rule).fullmatch(problem.path):
                    continue
                target = problem.path.removesuffix(rule.field) if rule.field else problem.path
                if rule.check(_at(resource, target)) == problem.message:
                    found = rule
                    break
            assert found is not None, f"{problem} passed the schema yet comes from no rule"
        yield problem, found


def _invalid_documents(path: Path) -> list[Any] | None:
    try:
        return _documents(path)
    except yaml.YAMLError:
        return None


def test_every_rule_is_exercised_by_an_invalid_example() -> None:
    covered: dict[rules.Rule, list[str]] = {}
    for invalid in INVALID:
        expected = _expected(invalid)
        for document in _invalid_documents(invalid) or []:
            for problem, rule in _attributed(document):
                assert f"{validation.name_of(document)}: {problem}" in expected, f"{invalid.name}: {problem}"
                if rule is not None:
                    covered.setdefault(rule, []).append(invalid.name)
    uncovered = [
        f"{rule.kind} {rule.scope}{rule.field} ({rule.check.__name__})"
        for rule in rules.RULES
        if rule not in covered
    ]
    assert not uncovered, "rules no invalid example exercises:\n  " + "\n  ".join(uncovered)


def test_each_invalid_example_makes_one_kind_of_mistake() -> None:
    for invalid in INVALID:
        documents = _invalid_documents(invalid)
        if documents is None:
            continue
        assert len(documents) == 1, invalid.name
        found = {rule for _, rule in _attributed(documents[0])}
        assert len(found) == 1, f"{invalid.name} trips several rules (or schema and rules): {found}"


def _api_server_cannot_judge(path: Path) -> bool:
    """Not YAML, an unknown kind or apiVersion, or a problem only Python checks (a rule without CEL)."""
    documents = _invalid_documents(path)
    if documents is None:
        return True
    for document in documents:
        if document.get("kind") not in api.KINDS or document.get("apiVersion") != api.API_VERSION:
            return True
        if any(rule is not None and not rule.cel for _, rule in _attributed(document)):
            return True
    return False


@pytest.mark.parametrize("invalid", INVALID, ids=[p.name for p in INVALID])
def test_apiserver_no_marks_exactly_the_examples_the_api_server_cannot_judge(invalid: Path) -> None:
    marked = bool(NOT_FOR_API_SERVER.search(invalid.read_text(encoding="utf-8")))
    assert marked == _api_server_cannot_judge(invalid)


def test_the_schema_level_mistakes_are_all_shown() -> None:
    reasons = " | ".join(line for invalid in INVALID for line in _expected(invalid))
    for needle in (
        ": unknown field; valid fields: ",
        ".port: expected an integer, got 'http'",
        ".port: 90010 is out of range; must be <= 65535",
        ": unsupported value 'weighted-round-robin'; valid: ",
        "spec.listeners: required",
        "is not a DNS label",
        ".weight: 1000 is out of range; must be <= 256",
        "kind: unsupported kind",
        "apiVersion: unsupported apiVersion",
        "-: not valid YAML",
        "spec.vip: '10.96.100.300' is not an IPv4 or IPv6 address",
        ".address: 'app.demo.svc' is not an IPv4 or IPv6 address",
        "VIPPool/pool: spec.addresses[1]: ",
    ):
        assert needle in reasons, needle

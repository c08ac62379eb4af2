"""The `layerlb` command as a user runs it: a real process, its exit code, its lines, and never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
VALID = EXAMPLES / "l7-proxy-routes.yaml"
INVALID = EXAMPLES / "invalid" / "engine-nftables-tunnel.yaml"
INVALID_LINE = (
    "LoadBalancer/web: spec.engine: engine nftables cannot do architecture tunnel (IP-in-IP); "
    "use engine ipvs, or architecture nat or dsr"
)
TIMEOUT = 120


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "LAYERLB_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _no_traceback(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done


def layerlb(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run `python -m layerlb.cli ARGS` to completion; every run is checked for a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "layerlb.cli", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=TIMEOUT,
    )
    return _no_traceback(done)


def _lines(text: str, prefix: str) -> set[str]:
    lines = text.splitlines()
    assert all(line.startswith(prefix) for line in lines), text
    return {line.removeprefix(prefix) for line in lines}


# --- validate ----------------------------------------------------------------------------------------


def test_validate_prints_ok_for_a_valid_file_and_exits_0() -> None:
    done = layerlb("validate", str(VALID))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{VALID}: LoadBalancer/shop: ok\n", "")


def test_validate_accepts_every_example_at_once() -> None:
    files = sorted(str(path) for path in EXAMPLES.glob("*.yaml"))
    done = layerlb("validate", *files)
    assert (done.returncode, done.stderr) == (0, "")
    assert {line.split(": ")[0] for line in done.stdout.splitlines()} == set(files)


def test_validate_prints_error_lines_on_stderr_and_exits_2_for_an_invalid_file() -> None:
    done = layerlb("validate", str(INVALID))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"{INVALID}: {INVALID_LINE}\n"


def test_validate_with_a_relative_path_prints_it_as_given() -> None:
    done = layerlb("validate", "examples/invalid/engine-nftables-tunnel.yaml")
    assert done.stderr == f"examples/invalid/engine-nftables-tunnel.yaml: {INVALID_LINE}\n"


def test_validate_reports_valid_and_invalid_files_together_and_exits_2() -> None:
    done = layerlb("validate", str(VALID), str(INVALID))
    assert done.returncode == 2
    assert done.stdout == f"{VALID}: LoadBalancer/shop: ok\n"
    assert done.stderr == f"{INVALID}: {INVALID_LINE}\n"


def test_validate_reads_standard_input_for_a_dash() -> None:
    done = layerlb("validate", "-", stdin=VALID.read_text(encoding="utf-8"))
    assert (done.returncode, done.stdout, done.stderr) == (0, "-: LoadBalancer/shop: ok\n", "")


def test_validate_of_an_invalid_standard_input_exits_2() -> None:
    done = layerlb("validate", "-", stdin=INVALID.read_text(encoding="utf-8"))
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"-: {INVALID_LINE}\n")


def test_validate_of_a_nonexistent_file_says_it_cannot_read_it() -> None:
    done = layerlb("validate", "no-such-file.yaml")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "no-such-file.yaml: -: cannot read the file: No such file or directory\n"


def test_validate_of_a_directory_says_it_cannot_read_it(tmp_path: Path) -> None:
    done = layerlb("validate", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == f"{tmp_path}: -: cannot read the file: Is a directory\n"


def test_validate_of_a_binary_file_says_it_cannot_read_it(tmp_path: Path) -> None:
    binary = tmp_path / "image.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")
    done = layerlb("validate", str(binary))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"{binary}: -: cannot read the file: 'utf-8' codec can't decode byte ")
    assert len(done.stderr.splitlines()) == 1


def test_validate_of_control_characters_says_it_is_not_yaml(tmp_path: Path) -> None:
    text = tmp_path / "controls.yaml"
    text.write_bytes(b"kind: LoadBalancer\x00\x01\n")
    done = layerlb("validate", str(text))
    assert done.returncode == 2
    assert done.stderr.startswith(f"{text}: -: not valid YAML")
    assert "#x0000" in done.stderr


def test_validate_of_an_empty_file_says_there_are_no_resources(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    comments = tmp_path / "comments.yaml"
    comments.write_text("# nothing here\n---\n---\n", encoding="utf-8")
    done = layerlb("validate", str(empty), str(comments))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"{empty}: -: no resources in the file\n{comments}: -: no resources in the file\n"
    )  # fmt: skip


def test_validate_of_a_multi_document_file_judges_each_document(tmp_path: Path) -> None:
    valid = yaml.safe_load(VALID.read_text(encoding="utf-8"))
    invalid = yaml.safe_load(INVALID.read_text(encoding="utf-8"))
    pool = yaml.safe_load((EXAMPLES / "vippool.yaml").read_text(encoding="utf-8"))
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump_all([valid, invalid, pool, ["not", "a", "resource"]]), encoding="utf-8")
    done = layerlb("validate", str(mixed))
    assert done.returncode == 2
    assert _lines(done.stdout, f"{mixed}: ") == {"LoadBalancer/shop: ok", "VIPPool/public: ok"}
    assert _lines(done.stderr, f"{mixed}: ") == {
        INVALID_LINE,
        "?/?: expected a Kubernetes resource (a mapping), got list",
    }


def test_validate_of_text_that_is_not_yaml_names_line_and_column() -> None:
    invalid = EXAMPLES / "invalid" / "not-yaml.yaml"
    done = layerlb("validate", str(invalid))
    assert done.returncode == 2
    assert done.stderr.startswith(f"{invalid}: -: not valid YAML at line 7, column 5: ")


HEAD = "apiVersion: layerlb.dev/v1alpha1\nkind: LoadBalancer\n"
ODD_INPUT = {
    "a-list": "- a\n- b\n",
    "a-string": "just a string\n",
    "a-number": "42\n",
    "kind-is-a-list": "kind: [LoadBalancer]\n",
    "kind-is-a-mapping": "kind: {name: LoadBalancer}\n",
    "apiversion-is-a-list": "apiVersion: [x]\nkind: LoadBalancer\n",
    "name-is-a-list-spec-is-a-list": HEAD + "metadata: {name: [web]}\nspec: []\n",
    "infinite-and-nan-numbers": HEAD
    + "metadata: {name: web}\nspec: {replicas: 1.0e+999, timeouts: {idleSeconds: .nan}}\n",
    "unicode-name-and-mode": HEAD + "metadata: {name: wéb}\nspec: {mode: Ł7}\n",
    "pool-address-is-a-mapping": HEAD.replace("LoadBalancer", "VIPPool")
    + "metadata: {name: p}\nspec: {addresses: [{}]}\n",
    "recursive-alias": "&a [*a]\n",
    "unclosed-braces": "{{{{\n",
    "byte-order-mark": "\ufeffkind: LoadBalancer\n",
}


@pytest.mark.parametrize("text", list(ODD_INPUT.values()), ids=list(ODD_INPUT))
def test_odd_input_is_refused_with_exit_2_and_error_lines(text: str) -> None:
    done = layerlb("validate", "-", stdin=text)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr and all(line.startswith("-: ") for line in done.stderr.splitlines()), done.stderr


# --- render ------------------------------------------------------------------------------------------


def test_render_prints_the_dataplane_json_of_a_valid_file() -> None:
    done = layerlb("render", "--format", "dataplane", str(VALID))
    assert (done.returncode, done.stderr) == (0, "")
    rendered = json.loads(done.stdout)
    assert (rendered["name"], rendered["namespace"], rendered["vip"]) == ("shop", "demo", "127.0.0.10")


def test_render_of_invalid_files_exits_2_with_the_same_lines_as_validate() -> None:
    files = sorted(str(path) for path in (EXAMPLES / "invalid").glob("*.yaml"))
    rendered = layerlb("render", *files)
    validated = layerlb("validate", *files)
    assert (rendered.returncode, rendered.stdout) == (2, "")
    assert (validated.returncode, validated.stdout) == (2, "")
    assert rendered.stderr == validated.stderr
    assert {line.split(": ")[0] for line in rendered.stderr.splitlines()} == set(files)


def test_render_of_a_valid_and_an_invalid_file_prints_nothing_but_the_errors() -> None:
    done = layerlb("render", str(VALID), str(INVALID))
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"{INVALID}: {INVALID_LINE}\n")


def test_render_of_a_file_without_a_load_balancer_says_so() -> None:
    pool = EXAMPLES / "vippool.yaml"
    done = layerlb("render", str(pool))
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"{pool}: no LoadBalancer to render\n")


def test_render_of_a_service_backend_explains_it_cannot_be_resolved_standalone(tmp_path: Path) -> None:
    document = yaml.safe_load(VALID.read_text(encoding="utf-8"))
    document["spec"]["backends"][0].pop("endpoints")
    document["spec"]["backends"][0]["service"] = {"name": "web", "port": 80}
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    assert layerlb("validate", str(path)).returncode == 0
    done = layerlb("render", str(path))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(
        f"{path}: LoadBalancer/shop: spec.backends[0].service: Service web cannot be resolved"
    )


def test_render_of_an_unknown_format_is_a_usage_error() -> None:
    done = layerlb("render", "--format", "yaml", str(VALID))
    assert (done.returncode, done.stdout) == (2, "")
    assert "invalid choice: 'yaml'" in done.stderr


# --- crd and usage ---------------------------------------------------------------------------------------


def test_crd_prints_four_custom_resource_definitions() -> None:
    done = layerlb("crd")
    assert (done.returncode, done.stderr) == (0, "")
    documents = [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]
    assert [doc["kind"] for doc in documents] == ["CustomResourceDefinition"] * 4
    assert {doc["apiVersion"] for doc in documents} == {"apiextensions.k8s.io/v1"}
    assert [doc["metadata"]["name"] for doc in documents] == [
        "loadbalancers.layerlb.dev",
        "vippools.layerlb.dev",
        "bgppeers.layerlb.dev",
        "bgpadvertisements.layerlb.dev",
    ]


def test_crd_write_creates_one_file_per_definition(tmp_path: Path) -> None:
    done = layerlb("crd", "--write", str(tmp_path / "crds"))
    assert done.returncode == 0
    written = sorted(path.name for path in (tmp_path / "crds").iterdir())
    assert len(written) == 4
    assert sorted(done.stdout.splitlines()) == [f"wrote {tmp_path / 'crds' / name}" for name in written]


@pytest.mark.parametrize("args", [(), ("validate",), ("frobnicate",), ("validate", "--bogus", "x.yaml")])
def test_usage_errors_exit_2_with_a_usage_line(args: tuple[str, ...]) -> None:
    done = layerlb(*args)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: layerlb")


def test_help_exits_0_and_lists_the_commands() -> None:
    done = layerlb("--help")
    assert done.returncode == 0
    for command in ("validate", "render", "crd"):
        assert command in done.stdout


def test_the_installed_console_script_runs() -> None:
    script = Path(sysconfig.get_path("scripts")) / "layerlb"
    assert script.exists(), f"the console script is not installed at {script}; pip install -e ."
    done = _no_traceback(
        subprocess.run(
            [str(script), "validate", str(VALID)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=TIMEOUT,
        )
    )
    assert (done.returncode, done.stdout) == (0, f"{VALID}: LoadBalancer/shop: ok\n")


def test_the_command_works_from_another_directory(tmp_path: Path) -> None:
    done = layerlb("validate", str(VALID), cwd=tmp_path)
    assert done.returncode == 0


# --- the stdlib `operator` module is not shadowed by the repository's `operator/` folder -----------------


@pytest.mark.parametrize("cwd", [ROOT, Path("/tmp")], ids=["repo-root", "tmp"])
@pytest.mark.parametrize("pythonpath", [True, False], ids=["with-repo-on-path", "plain"])
def test_the_stdlib_operator_module_is_importable(cwd: Path, pythonpath: bool) -> None:
    env = _env() if pythonpath else {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", "import operator; operator.itemgetter; print(operator.__file__)"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    location = Path(done.stdout.strip()).resolve()
    assert location.name == "operator.py"
    assert ROOT not in location.parents, f"operator imported from the repository: {location}"


# --- the forwarding pod loads Plans only ---------------------------------------------------------------------


def test_the_forwarding_pods_command_loads_no_yaml_validation_or_resolution() -> None:
    front_end = [
        "yaml",
        "layerlb.documents",
        "layerlb.validation",
        "layerlb.resolve",
        "layerlb.rules",
        "layerlb.crd",
    ]
    # What `layerlb dataplane --plan-configmap` imports before it serves: the parser and the data plane.
    script = (
        "import sys\n"
        "from layerlb import cli\n"
        "cli.parser()\n"
        "from layerlb_dataplane.control import admin, config, kube_source, serve\n"
        f"print(sorted(set({front_end!r}) & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=TIMEOUT
    )
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr

"""What of the kind suite can be checked without Docker: the script's syntax, the kind config, the Helm
values it installs with, that the suite is collected in kind mode only, the VIP routes it plumbs, and the
GitHub Actions workflow that runs it."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from e2e import examples
from tests.test_chart import helm

KIND = Path(__file__).resolve().parent
ROOT = KIND.parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "kind-e2e.yml"
PINNED = re.compile(r"v\d+\.\d+\.\d+")


def test_run_sh_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(KIND / "run.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(KIND / "run.sh", os.X_OK)


def test_kind_config_has_a_node_per_host_network_replica_and_keeps_clear_of_the_vips() -> None:
    config = yaml.safe_load((KIND / "cluster.yaml").read_text())
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    from e2e.nodes.platform import Kind
    from e2e.nodes.test_examples import HOST_NETWORK_EXAMPLES

    VIPS = Kind(env={}, image="", namespace="").vips
    replicas = [
        document["spec"].get("replicas", 1)
        for file in HOST_NETWORK_EXAMPLES["kind"]
        for document in examples.documents(file)
        if document["kind"] == "LoadBalancer"
    ]
    workers = [node for node in config["nodes"] if node["role"] == "worker"]  # kind taints the control plane
    assert len(workers) >= max(replicas), "host ports allow one forwarding pod per node"
    first, last = (ipaddress.ip_address(a) for a in VIPS.split("-"))
    for subnet in (config["networking"]["podSubnet"], config["networking"]["serviceSubnet"]):
        network_ = ipaddress.ip_network(subnet)
        assert first not in network_ and last not in network_, subnet


def test_the_helm_values_run_the_loaded_image_for_operator_and_forwarding_pods() -> None:
    done = helm("template", "layerlb", str(ROOT / "charts" / "layerlb"), "-f", str(KIND / "values.yaml"))
    assert done.returncode == 0, done.stderr
    [deployment] = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("layerlb:kind-e2e", "Never")
    env = {item["name"]: item.get("value") for item in container.get("env") or []}
    assert env["LAYERLB_DATAPLANE_IMAGE"] == "layerlb:kind-e2e"
    assert "layerlb:kind-e2e" in (KIND / "run.sh").read_text()


def _collected(mode: bool) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "LAYERLB_KIND_CLUSTER"}
    if mode:
        env["LAYERLB_KIND_CLUSTER"] = "layerlb-e2e"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / "e2e" / "nodes")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_the_real_node_suite_runs_every_example_on_kind_and_what_this_kernel_can_locally() -> None:
    local, kind_mode = _collected(False), _collected(True)
    assert not [t for t in kind_mode if "test_local_nodes.py" in t], (
        "the local platform's checks need its nodes"
    )
    examples = [t for t in kind_mode if "test_examples.py" in t]
    assert len(examples) == 4 + 5, kind_mode  # four proxy examples with traffic, five host-network ones
    assert len([t for t in local if "test_examples.py" in t]) == 4 + 2, local  # no IPVS, no IP-in-IP here
    assert "run.sh" not in " ".join(kind_mode)
    assert "e2e/nodes" in (KIND / "run.sh").read_text()


def _uses(steps: list[dict[str, Any]], action: str) -> dict[str, Any]:
    found = [step for step in steps if str(step.get("uses", "")).split("@")[0] == action]
    assert found, f"no step uses {action} before `make kind-e2e`"
    return dict(found[0].get("with") or {})


def test_the_workflow_runs_make_kind_e2e_on_push_and_pull_requests_with_pinned_tools() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 (PyYAML) reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers), triggers
    jobs = workflow["jobs"]
    running = [
        job for job in jobs.values() if any("make kind-e2e" in str(s.get("run")) for s in job["steps"])
    ]
    assert len(running) == 1, "exactly one job runs `make kind-e2e`"
    [job] = running
    assert str(job["runs-on"]).startswith("ubuntu"), "run.sh needs Docker on a Linux runner"
    steps = job["steps"]
    at = next(i for i, step in enumerate(steps) if "make kind-e2e" in str(step.get("run")))
    before = steps[:at]
    # run.sh's tools (docker comes with the runner): Python (its .venv), kind and kubectl, helm.
    python = _uses(before, "actions/setup-python")["python-version"]
    assert isinstance(python, str), "quote python-version (an unquoted 3.10 reads as 3.1)"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.fullmatch(r">=\s*3\.(\d+)", requires)
    assert minimum and int(python.split(".")[1]) >= int(minimum[1]), (python, requires)
    assert any(".venv/.installed" in str(s.get("run")) or "make setup" in str(s.get("run")) for s in before)
    kind = _uses(before, "helm/kind-action")
    assert kind.get("install_only") is True, "run.sh creates the cluster from e2e/kind/cluster.yaml itself"
    helm_version = _uses(before, "azure/setup-helm").get("version", "")
    for version in (kind.get("version", ""), kind.get("kubectl_version", ""), helm_version):
        assert PINNED.fullmatch(str(version)), f"pin kind, kubectl and helm to a release, not {version!r}"
    for each in jobs.values():
        for step in each["steps"]:
            if "uses" in step:
                ref = step["uses"].partition("@")[2]
                assert ref and ref not in ("main", "master"), f"pin {step['uses']} to a release"

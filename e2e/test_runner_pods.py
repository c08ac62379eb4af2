"""The pod runner's reading of a pod: what the operator's pod template turns into (no cluster needed).

The pods here are the operator's own Deployment templates (`layerlb_operator.objects`) with what the
API server adds (the ServiceAccount token volume), so a change on either side that the runner would
start differently, or not at all, shows here first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from layerlb_operator import objects

from e2e.kube import ROOT
from e2e.runner import pods
from layerlb import api


def _pod(example: str) -> dict[str, Any]:
    document = next(
        d
        for d in yaml.safe_load_all((ROOT / "examples" / example).read_text())
        if d["kind"] == "LoadBalancer"
    )
    resource = api.LoadBalancer.model_validate(document)
    template = objects.deployment("demo", resource.metadata.name, "uid-1", resource.spec, objects.Settings())
    spec = template["spec"]["template"]["spec"]
    # What the ServiceAccount admission plugin adds to every pod that automounts its token.
    spec["volumes"].append({"name": "kube-api-access-x", "projected": {"sources": []}})
    spec["containers"][0]["volumeMounts"].append(
        {"name": "kube-api-access-x", "mountPath": pods.SERVICE_ACCOUNT_DIR, "readOnly": True}
    )
    return {"metadata": {"name": "shop-abc", "namespace": "demo", "uid": "pod-uid"}, "spec": spec}


def _launch(pod: dict[str, Any]) -> pods.Launch:
    return pods.launch(pod, host_ip="172.30.1.2", pod_ip="172.30.2.2", api_host="10.0.0.1", api_port=443)


def test_a_proxy_pod_runs_its_own_command_as_the_non_root_user_with_no_capabilities() -> None:
    launch = _launch(_pod("l7-proxy-routes.yaml"))
    assert launch.argv[0] == str(pods.VENV_BIN / "layerlb")
    assert launch.argv[1:] == ("dataplane", "--plan-configmap", "demo/shop-plan", "--admin", "0.0.0.0:9090")
    assert (launch.uid, launch.gid, launch.groups, launch.capabilities) == (65532, 65532, (65532,), ())
    assert launch.no_new_privileges and launch.read_only_root and not launch.host_network
    assert launch.memory_mounts == ("/tmp",) and launch.automount_token
    assert launch.env["POD_NAME"] == "shop-abc" and launch.env["POD_NAMESPACE"] == "demo"
    assert (launch.env["KUBERNETES_SERVICE_HOST"], launch.env["KUBERNETES_SERVICE_PORT"]) == (
        "10.0.0.1",
        "443",
    )
    assert launch.readiness == pods.Probe("/readyz", 9090, 1.0, 1.0, 3)


def test_a_kernel_pod_is_root_on_the_host_network_with_only_net_admin_and_net_raw() -> None:
    launch = _launch(_pod("l4-nat-ipvs.yaml"))
    assert launch.host_network and launch.uid == 0
    assert launch.capabilities == ("NET_ADMIN", "NET_RAW")
    wrapper = pods.wrapper(launch, Path("/state/pod/serviceaccount"))
    assert "--bounding-set=-all,+net_admin,+net_raw" in wrapper
    script = wrapper[wrapper.index("-c") + 1]
    # The token is bound before the emptyDir tmpfs covers /tmp, where the folder may live.
    assert script.index(pods.SERVICE_ACCOUNT_DIR) < script.index("tmpfs")


def test_what_the_runner_cannot_honour_is_refused_with_the_field() -> None:
    pod = _pod("l4-proxy-tcp.yaml")
    env = pod["spec"]["containers"][0]["env"]
    env.append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s"}}})
    where = rf"containers\[0\]\.env\[{len(env) - 1}\] \(X\)"
    with pytest.raises(pods.PodError, match=where + ": only value and fieldRef"):
        _launch(pod)
    pod = _pod("l4-proxy-tcp.yaml")
    pod["spec"]["securityContext"]["runAsUser"] = 0
    with pytest.raises(pods.PodError, match="runAsNonRoot is true but the container would run as root"):
        _launch(pod)

"""kopf's settings: the operator's own watches are narrowed by the API server, not after the fact."""

from __future__ import annotations

from typing import Any

import kopf
from kopf._cogs.structs import references
from layerlb_operator import handlers


def _selectors(group: str, version: str, plural: str) -> list[str]:
    settings = kopf.OperatorSettings()
    configure: Any = handlers.configure  # kopf types it as its callback protocol; it is the plain function
    configure(settings=settings)
    resource = references.Resource(group=group, version=version, plural=plural, namespaced=True)
    return list(settings.watching.label_selectors.collect(resource))


def test_pods_deployments_and_report_configmaps_are_selected_server_side() -> None:
    ours = "app.kubernetes.io/component=dataplane,app.kubernetes.io/name=layerlb"
    assert _selectors("", "v1", "pods") == [ours]
    assert _selectors("apps", "v1", "deployments") == [ours]
    assert _selectors("", "v1", "configmaps") == ["app.kubernetes.io/name=layerlb,layerlb.dev/report=serving"]


def test_what_load_balancers_refer_to_is_watched_whole() -> None:
    for group, plural in [("", "services"), ("", "secrets"), ("discovery.k8s.io", "endpointslices")]:
        assert _selectors(group, "v1", plural) == []

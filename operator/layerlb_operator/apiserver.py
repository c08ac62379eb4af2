"""The operator's requests to the API server: server-side apply, status patches, Events and the Lease.

Blocking (the kubernetes client under it); the reconciler calls it from worker threads. Every write goes
through `Client.write`, which counts it, so tests and metrics can tell a replica that writes from one
that only watches.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from kubernetes import client as k8s
from kubernetes import config as _config

k8s_config: Any = _config  # the kubernetes package ships no types for its config loaders

FIELD_MANAGER: Final = "layerlb-operator"
APPLY_PATCH: Final = "application/apply-patch+yaml"
MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"

log = logging.getLogger("layerlb.operator")

# The kinds the operator writes, and where they live.
PLURALS: Final = {
    "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Deployment": "deployments",
    "Event": "events",
    "Lease": "leases",
    "LoadBalancer": "loadbalancers",
    "Service": "services",
    "VIPPool": "vippools",
    "BGPPeer": "bgppeers",
}


class ApiError(Exception):
    """A request the API server refused or could not answer; `status` is the HTTP code (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status


def load_configuration() -> Any:
    """The in-cluster ServiceAccount when running in a pod, else the current kubeconfig."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        try:
            k8s_config.load_kube_config()
        except k8s_config.ConfigException as error:
            raise OSError(f"no Kubernetes credentials (in-cluster or kubeconfig): {error}") from None
    return k8s.ApiClient()


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    """`/api/v1/namespaces/NS/configmaps` and the like."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{scope}/{PLURALS[kind]}"


def object_path(obj: dict[str, Any]) -> str:
    """The URL path of a namespaced object given as a dict."""
    meta = obj["metadata"]
    return f"{collection_path(obj['apiVersion'], obj['kind'], meta.get('namespace'))}/{meta['name']}"


class Client:
    """A few verbs over the kubernetes client's `ApiClient`, with JSON in and out."""

    def __init__(self, api_client: Any, field_manager: str = FIELD_MANAGER) -> None:
        self.api_client = api_client
        self.field_manager = field_manager
        self.writes: Counter[str] = Counter()
        # Set by a replica under leader election (`lease.Elector.leading`): False once its Lease may have
        # passed to another replica, and then no write goes out (see `write`).
        self.may_write: Callable[[], bool] | None = None

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One request; the decoded JSON answer, or `ApiError`."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            method, url, headers, body, _ = self.api_client.param_serialize(
                method,
                path,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api_client.call_api(
                method, url, header_params=headers, body=body, _request_timeout=30
            )
            response.read()
        except k8s.ApiException as error:
            raise ApiError(int(error.status or 0), str(error.reason)) from None
        except Exception as error:  # connection refused, TLS, timeouts: all say the same thing to a caller
            raise ApiError(0, f"{type(error).__name__}: {error}") from None
        text = (response.data or b"").decode("utf-8", "replace")
        try:
            answer = json.loads(text) if text else {}
        except ValueError:
            answer = {"message": text}
        if not 200 <= response.status < 300:
            raise ApiError(response.status, str(answer.get("message") or text or response.reason))
        return answer if isinstance(answer, dict) else {}

    def write(self, kind: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A request that may change cluster state, counted by kind.

        Refused (`ApiError` 0, a transient error: the caller retries later) while `may_write` says this
        replica's Lease may have passed on: a leader frozen past its Lease (a stalled node, a paused
        cgroup) wakes with queued work and would otherwise write alongside the replica that took over
        before its own renewal loop notices. The Lease's own writes pass: they are how a replica takes it."""
        if kind != "Lease" and self.may_write is not None and not self.may_write():
            raise ApiError(0, f"not writing {kind}: this replica's Lease is not current (another may lead)")
        self.writes[kind] += 1
        return self.request(method, path, **kwargs)

    def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply `obj` as the operator's field manager, taking over conflicting fields (without
        `force`, a field another manager set to another value is a 409 instead: an object someone else
        created in the meantime is not taken over)."""
        return self.write(
            obj["kind"],
            "PATCH",
            object_path(obj),
            query=[("fieldManager", self.field_manager), *([("force", "true")] if force else [])],
            body=obj,  # JSON is YAML: the apply-patch+yaml body is the object as JSON
            content_type=APPLY_PATCH,
        )

    def delete_loadbalancer(self, namespace: str, name: str, uid: str) -> dict[str, Any]:
        """Delete the LoadBalancer only if it is still the object `uid` (else 409): one the user created
        under the same name since is never deleted. Its dependents go through the garbage collector."""
        path = collection_path("layerlb.dev/v1alpha1", "LoadBalancer", namespace) + f"/{name}"
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": uid},
            "propagationPolicy": "Background",
        }
        return self.write("LoadBalancer", "DELETE", path, body=body)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch a LoadBalancer's status subresource (the operator is its only writer)."""
        path = collection_path("layerlb.dev/v1alpha1", "LoadBalancer", namespace) + f"/{name}/status"
        return self.write(
            "LoadBalancerStatus", "PATCH", path, query=[("fieldManager", self.field_manager)],
            body={"status": status}, content_type=MERGE_PATCH,
        )  # fmt: skip

    def apply_service_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply a Service's status: the operator owns its ingress and its condition types only,
        so other writers' conditions stay and a field it stops applying is removed."""
        body = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "status": status,
        }
        return self.write(
            "ServiceStatus", "PATCH", collection_path("v1", "Service", namespace) + f"/{name}/status",
            query=[("fieldManager", self.field_manager), ("force", "true")],
            body=body, content_type=APPLY_PATCH,
        )  # fmt: skip

    def apply_pool_status(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply a VIPPool's status (`body`: the whole apply object, see pool_status): the
        operator owns its condition types only, so the speakers' `status.nodes` entries stay."""
        return self.write(
            "VIPPoolStatus", "PATCH", collection_path(body["apiVersion"], "VIPPool", None) + f"/{name}/status",
            query=[("fieldManager", self.field_manager), ("force", "true")],
            body=body, content_type=APPLY_PATCH,
        )  # fmt: skip

    def apply_peer_status(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply a BGPPeer's status (`body`: see bgp_status): the operator's `Established`
        condition only, so the speakers' `status.nodes` entries stay."""
        return self.write(
            "BGPPeerStatus", "PATCH", collection_path(body["apiVersion"], "BGPPeer", None) + f"/{name}/status",
            query=[("fieldManager", self.field_manager), ("force", "true")],
            body=body, content_type=APPLY_PATCH,
        )  # fmt: skip

    def drop_service_conditions(self, namespace: str, name: str, types: list[str]) -> dict[str, Any]:
        """Delete a Service's status conditions of `types`, whoever wrote them (a strategic merge patch:
        conditions are a list keyed by type), leaving every other condition as it is."""
        body = {"status": {"conditions": [{"type": kind, "$patch": "delete"} for kind in types]}}
        return self.write(
            "ServiceStatus", "PATCH", collection_path("v1", "Service", namespace) + f"/{name}/status",
            query=[("fieldManager", self.field_manager)], body=body, content_type=STRATEGIC_MERGE_PATCH,
        )  # fmt: skip

    def set_service_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> dict[str, Any]:
        """Replace a Service's finalizers, only if it is still at `resource_version` (else 409): the list
        is shared with other controllers, so a stale view must not drop theirs."""
        body = {"metadata": {"finalizers": finalizers or None, "resourceVersion": resource_version}}
        return self.write(
            "Service", "PATCH", collection_path("v1", "Service", namespace) + f"/{name}",
            query=[("fieldManager", self.field_manager)], body=body, content_type=MERGE_PATCH,
        )  # fmt: skip

    def post_event(self, involved: dict[str, Any], event: dict[str, Any]) -> None:
        """Create a core/v1 Event about `involved`; an Event that cannot be posted is logged, never raised."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'layerlb')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "source": {"component": self.field_manager},
            "reportingComponent": self.field_manager,
            "count": 1,
            **event,
        }
        try:
            self.write("Event", "POST", collection_path("v1", "Event", namespace), body=body)
        except ApiError as error:
            log.warning(
                "could not post the Event %s on %s/%s: %s",
                event.get("reason"),
                namespace,
                meta.get("name"),
                error,
            )

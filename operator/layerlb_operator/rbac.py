"""The operator's own permissions as data, so the Helm chart renders exactly what the code uses.

Least privilege, verb by verb:

- it reads (list/watch) what it watches: LoadBalancers, VIPPools, Services, EndpointSlices, Secrets
  (TLS material), and its forwarding pods and their Deployments (for `Ready`);
- it writes its owned objects by server-side apply, which is a PATCH that creates a missing object, so
  `create` + `patch` on each kind; it never deletes them (the garbage collector does), but for a
  Service's derived LoadBalancer (below);
- Roles it creates grant get/list/watch on the Plan ConfigMap, patch on the serving-report one and get
  on the TLS Secrets the LoadBalancer names (its pods read the private keys there: keys never go into a
  ConfigMap), and Kubernetes lets nobody grant what they do not hold (no `escalate` verb here), so it
  holds those verbs on ConfigMaps and `get` on Secrets too; it also watches the report ConfigMaps (for `Ready` and the deletion wait);
- kopf patches LoadBalancers (its finalizer and progress annotations), the operator patches their status,
  and setting `blockOwnerDeletion` on owner references needs `update` on `loadbalancers/finalizers`;
- a Service asking for a layerlb architecture gets a derived LoadBalancer (service_loadbalancer), written
  by server-side apply (`create` + `patch` on loadbalancers) with a `blockOwnerDeletion` owner reference
  to the Service (`update` on `services/finalizers`), and deleted when the Service stops asking for it:
  `delete` on loadbalancers is the operator's only delete verb (a uid precondition limits it to the
  derived LoadBalancer the Service controls; everything else goes through the garbage collector);
- a VIPPool's `InterfacesFound` condition (pool_status) is its own server-side apply on `vippools/status`
  (`patch`); the speakers' per-node entries next to it are theirs;
- BGP: it reads BGPPeers and BGPAdvertisements (list/watch) and writes a BGPPeer's aggregate `Established`
  condition by server-side apply on `bgppeers/status` (`patch`); the speakers' per-node session entries
  next to it are theirs;
- kopf posts Events; the Lease of leader election is read and updated by name only;
- a pod-network LoadBalancer's VIP Service (objects.vip_service) is written like its other objects
  (`create` + `patch` on services) and its ingress by server-side apply on `services/status`;
- Services of type LoadBalancer (service_reconciler): `patch` on `services` for its finalizer
  (`layerlb.dev/service`, a merge patch guarded by the resourceVersion) and on `services/status` for
  `status.loadBalancer.ingress` and its conditions (server-side apply); Events about them are posted
  with the `create` on events above.
"""

from __future__ import annotations

from typing import Any

READ = ["list", "watch"]
APPLY = ["create", "patch"]


def _rule(
    group: str, resources: list[str], verbs: list[str], names: list[str] | None = None
) -> dict[str, Any]:
    rule: dict[str, Any] = {"apiGroups": [group], "resources": resources, "verbs": verbs}
    if names is not None:
        rule["resourceNames"] = names
    return rule


def cluster_rules() -> list[dict[str, Any]]:
    """The ClusterRole rules of the operator (cluster-wide mode; a namespaced install binds them per namespace)."""
    return [
        _rule("layerlb.dev", ["loadbalancers"], [*READ, *APPLY, "delete"]),
        _rule("layerlb.dev", ["loadbalancers/status"], ["patch"]),
        _rule("layerlb.dev", ["loadbalancers/finalizers"], ["update"]),
        _rule("layerlb.dev", ["vippools"], READ),
        _rule("layerlb.dev", ["vippools/status"], ["patch"]),
        _rule("layerlb.dev", ["bgppeers", "bgpadvertisements"], READ),
        _rule("layerlb.dev", ["bgppeers/status"], ["patch"]),
        _rule("", ["services", "pods"], READ),
        _rule("", ["services"], APPLY),
        _rule("", ["services/status"], ["patch"]),
        _rule("", ["services/finalizers"], ["update"]),
        _rule("", ["secrets"], ["get", *READ]),
        _rule("discovery.k8s.io", ["endpointslices"], READ),
        _rule("", ["configmaps"], ["get", *READ, *APPLY]),
        _rule("", ["serviceaccounts"], APPLY),
        _rule("rbac.authorization.k8s.io", ["roles", "rolebindings"], APPLY),
        _rule("apps", ["deployments"], [*READ, *APPLY]),
        _rule("", ["events"], ["create"]),
        _rule("events.k8s.io", ["events"], ["create"]),
    ]


def lease_rules(lease_name: str) -> list[dict[str, Any]]:
    """The Role rules, in the operator's namespace, for leader election on the Lease `lease_name`."""
    return [
        _rule("coordination.k8s.io", ["leases"], ["get", "update"], [lease_name]),
        # `create` cannot be narrowed by name: the name is not known to the authorizer before the object exists.
        _rule("coordination.k8s.io", ["leases"], ["create"]),
    ]

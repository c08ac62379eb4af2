"""The operator's ClusterRole is data with exactly the verbs it uses: no wildcards, no escalation, and no
deletes but of the LoadBalancers it derives from Services."""

from __future__ import annotations

from layerlb_operator import rbac


def _verbs(rules: list[dict[str, object]]) -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:  # type: ignore[attr-defined]
            for resource in rule["resources"]:  # type: ignore[attr-defined]
                table.setdefault((group, resource), set()).update(rule["verbs"])  # type: ignore[arg-type]
    return table


def test_the_operator_reads_what_it_watches_and_writes_only_what_it_owns() -> None:
    verbs = _verbs(rbac.cluster_rules())
    assert verbs == {
        # create + patch + delete: a Service's derived LoadBalancer (service_loadbalancer)
        ("layerlb.dev", "loadbalancers"): {"list", "watch", "create", "patch", "delete"},
        ("layerlb.dev", "loadbalancers/status"): {"patch"},
        ("layerlb.dev", "loadbalancers/finalizers"): {"update"},
        ("layerlb.dev", "vippools"): {"list", "watch"},
        ("layerlb.dev", "vippools/status"): {"patch"},  # its InterfacesFound condition (pool_status)
        ("layerlb.dev", "bgppeers"): {"list", "watch"},
        ("layerlb.dev", "bgpadvertisements"): {"list", "watch"},
        ("layerlb.dev", "bgppeers/status"): {"patch"},  # a BGPPeer's aggregate Established condition
        # patch: its finalizer on Services it serves; create + patch: the VIP Services of pod-network LoadBalancers
        ("", "services"): {"list", "watch", "create", "patch"},
        ("", "services/status"): {"patch"},  # status.loadBalancer.ingress and its conditions
        # blockOwnerDeletion on a derived LoadBalancer's owner reference to its Service
        ("", "services/finalizers"): {"update"},
        ("", "secrets"): {"get", "list", "watch"},  # get: to grant its pods get on their TLS Secrets
        ("", "pods"): {"list", "watch"},
        ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
        ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
        ("", "serviceaccounts"): {"create", "patch"},
        ("rbac.authorization.k8s.io", "roles"): {"create", "patch"},
        ("rbac.authorization.k8s.io", "rolebindings"): {"create", "patch"},
        ("apps", "deployments"): {"list", "watch", "create", "patch"},
        ("", "events"): {"create"},
        ("events.k8s.io", "events"): {"create"},
    }


def test_no_rule_uses_wildcards_deletes_or_privilege_escalation_verbs() -> None:
    """The one exception: `delete` on LoadBalancers, for a Service's derived one (service_loadbalancer)."""
    for rule in [*rbac.cluster_rules(), *rbac.lease_rules("layerlb-operator")]:
        text = repr(rule)
        assert "*" not in text
        for verb in ("delete", "deletecollection", "escalate", "bind", "impersonate"):
            if verb == "delete" and (rule["apiGroups"], rule["resources"]) == (
                ["layerlb.dev"],
                ["loadbalancers"],
            ):
                continue
            assert verb not in rule["verbs"]
    deleting = [rule for rule in rbac.cluster_rules() if "delete" in rule["verbs"]]
    assert deleting == [
        {
            "apiGroups": ["layerlb.dev"],
            "resources": ["loadbalancers"],
            "verbs": ["list", "watch", "create", "patch", "delete"],
        }
    ]


def test_the_lease_is_read_and_renewed_by_name() -> None:
    named = [rule for rule in rbac.lease_rules("my-lease") if "resourceNames" in rule]
    assert named == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "update"],
            "resourceNames": ["my-lease"],
        }
    ]

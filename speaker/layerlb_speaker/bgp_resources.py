"""BGPPeer and BGPAdvertisement objects → the speaker's `bgp.Intent` (pure; the Secret is read by a callable).

Kubernetes mode's counterpart of the static `bgp:` section: each object goes through the core's
`validation.validate` (`bgp.problems_of`), the one path the CLI and the API server's CEL rules share, so a
speaker never applies what `kubectl apply` would refuse. An object that does not validate (a stale CRD let
it in) is left out and reported once in the log; it opens no session.

A BGPPeer's `passwordSecret` is read through `read_secret`; the speaker may read Secrets in its own
namespace only (a namespaced Role in the release namespace, not a ClusterRole over every Secret). A peer
whose Secret is elsewhere, missing, without the key, or holding what BIRD cannot take, keeps its place in
the intent with a `problem` and no session: the problem is its nodes' `lastError` in the BGPPeer's status
("passwordSecret: Secret kube-system/tor not found"), instead of a session without the password, which the
router would refuse anyway, or a crash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from layerlb import api
from layerlb_speaker import bgp

Object = Mapping[str, Any]


class SecretProblem(Exception):
    """A Secret (or its key) that cannot be read: the message says which and why, for a peer's lastError."""


ReadSecret = Callable[[str, str, str], str]  # (namespace, name, key) → the value; SecretProblem otherwise


def _name(obj: Object) -> Any:
    return (obj.get("metadata") or {}).get("name")


def password(ref: api.SecretKeyRef, namespace: str | None, read_secret: ReadSecret) -> str:
    """The password `ref` names, checked as BIRD needs it; SecretProblem says why not."""
    where = f"Secret {ref.namespace}/{ref.name}"
    if namespace is not None and ref.namespace != namespace:
        raise SecretProblem(
            f"passwordSecret: {where} is outside the speaker's namespace {namespace}, where it may read "
            "Secrets only; create the Secret there"
        )
    value = read_secret(ref.namespace, ref.name, ref.key)
    why = bgp.password_problem(value)
    if why is not None:
        raise SecretProblem(f"passwordSecret: {where} key {ref.key}: {why}")
    return value


def intent(
    peers: Iterable[Object],
    advertisements: Iterable[Object],
    labels: Mapping[str, Mapping[str, str]],
    read_secret: ReadSecret,
    namespace: str | None,
) -> tuple[bgp.Intent, list[str]]:
    """The BGP intent the objects describe, and one line per object left out (`BGPPeer tor: peerASN: ...`).
    `namespace`: where the speaker may read Secrets (None: anywhere its RBAC allows)."""
    invalid: list[str] = []
    found: list[bgp.Peer] = []
    for obj in sorted(peers, key=lambda each: str(_name(each))):
        resource, problems = bgp.problems_of("BGPPeer", _name(obj), obj.get("spec"))
        if resource is None:
            invalid.append(f"BGPPeer {_name(obj)}: {'; '.join(problems)}")
            continue
        assert isinstance(resource, api.BGPPeer)
        peer = bgp.peer(resource)
        ref = resource.spec.passwordSecret
        if ref is not None:
            try:
                peer = dataclasses.replace(peer, password=password(ref, namespace, read_secret))
            except SecretProblem as problem:
                peer = dataclasses.replace(peer, problem=str(problem))
        found.append(peer)
    ads: list[bgp.Advertisement] = []
    for obj in sorted(advertisements, key=lambda each: str(_name(each))):
        resource, problems = bgp.problems_of("BGPAdvertisement", _name(obj), obj.get("spec"))
        if resource is None:
            invalid.append(f"BGPAdvertisement {_name(obj)}: {'; '.join(problems)}")
            continue
        assert isinstance(resource, api.BGPAdvertisement)
        ads.append(bgp.advertisement(resource))
    return bgp.Intent(tuple(found), tuple(ads), labels), invalid

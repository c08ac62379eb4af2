"""The contract between the operator and its forwarding pods: how a Plan travels and how pods answer.

The operator writes, per LoadBalancer:
- the Plan ConfigMap, its Plan JSON under `data[PLAN_KEY]`; `REMOVED_PLAN` (no Plan) once the
  LoadBalancer is being deleted, which means "serve nothing and remove the kernel state". Its annotation
  `SERVING_ANNOTATION` names the ConfigMap the pods report to.
- TLS private keys stay in their Secrets (far fewer roles read Secrets than ConfigMaps): a certificate
  from a Secret has `source` `Secret/NAME` (`secret_source`) and is stored with its `key_pem` empty
  (`without_keys`). The pod reads the Secrets the stored Plan names (`secrets_named`) and fills chain and
  key back in (`with_keys`), on the typed Plan it parsed.

Each forwarding pod reports into the serving ConfigMap: `data[POD]` is the generation it fully serves,
or `REMOVED` once it applied `REMOVED_PLAN`; `data[POD + WARNINGS_SUFFIX]` what its node lacks though it
serves (one warning a line), absent when nothing is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from layerlb import plan

PLAN_KEY: Final = "plan.json"
REMOVED_PLAN: Final = "[]"
SERVING_ANNOTATION: Final = "layerlb.dev/serving-configmap"
REMOVED: Final = "removed"
WARNINGS_SUFFIX: Final = ".warnings"
SECRET_SOURCE: Final = "Secret/"

# A DNS-1123 subdomain of at most 253 characters: what Kubernetes accepts as a Secret's name.
_SECRET_NAME: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_MAX_SECRET_NAME: Final = 253


class MissingSecret(Exception):
    """`with_keys` was not given the chain and key of Secrets the Plan names; `names` sorted."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = sorted(names)
        super().__init__(f"no chain and key read yet from Secret {', '.join(self.names)}")


def secret_source(name: str) -> str:
    """The `source` of a certificate read from Secret `name` of the LoadBalancer's namespace."""
    return f"{SECRET_SOURCE}{name}"


def secret_name(source: str) -> str | None:
    """The Secret a certificate's `source` names, None when it names none; ValueError, saying what a valid
    one looks like, when it starts with `Secret/` but the rest is not a Secret name."""
    if not source.startswith(SECRET_SOURCE):
        return None
    name = source.removeprefix(SECRET_SOURCE)
    if not _SECRET_NAME.match(name) or len(name) > _MAX_SECRET_NAME:
        raise ValueError(
            f"certificate source {source!r}: expected {SECRET_SOURCE}NAME, NAME a Secret name "
            f"(lower-case letters, digits, '-' and '.', at most {_MAX_SECRET_NAME} characters)"
        )
    return name


def without_keys(resolved: plan.Plan) -> tuple[plan.Plan, list[str]]:
    """The Plan as its ConfigMap carries it, every Secret certificate's `key_pem` left out, and those
    Secrets' names (sorted): what the forwarding pods' Role may read."""
    names: set[str] = set()

    def stored(certificate: plan.Certificate) -> plan.Certificate:
        name = secret_name(certificate.source)
        if name is None:
            return certificate
        names.add(name)
        return certificate.model_copy(update={"key_pem": ""})

    return _certificates_mapped(resolved, stored), sorted(names)


def secrets_named(stored: plan.Plan) -> set[str]:
    """The Secrets a stored Plan takes keys from: those of its certificates whose `key_pem` is left out;
    ValueError for a malformed `source` (see `secret_name`)."""
    return {name for certificate in _certificates(stored) if (name := _keyless(certificate)) is not None}


def with_keys(stored: plan.Plan, pairs: Mapping[str, tuple[str, str]]) -> plan.Plan:
    """A stored Plan with each left-out key filled from `pairs` (Secret name → (tls.crt, tls.key)),
    the chain too: a renewed certificate comes with its key. `MissingSecret` names the Secrets `pairs`
    lacks; ValueError for a malformed `source`."""
    missing = secrets_named(stored) - set(pairs)
    if missing:
        raise MissingSecret(missing)

    def filled(certificate: plan.Certificate) -> plan.Certificate:
        name = _keyless(certificate)
        if name is None:
            return certificate
        cert, key = pairs[name]
        return certificate.model_copy(update={"cert_pem": cert, "key_pem": key})

    return _certificates_mapped(stored, filled)


def _keyless(certificate: plan.Certificate) -> str | None:
    """The Secret holding this certificate's key when the stored Plan left the key out."""
    return secret_name(certificate.source) if certificate.key_pem == "" else None


def _certificates(p: plan.Plan) -> Iterable[plan.Certificate]:
    return (certificate for listener in p.listeners for certificate in listener.certificates)


def _certificates_mapped(p: plan.Plan, change: Callable[[plan.Certificate], plan.Certificate]) -> plan.Plan:
    """`p` with every certificate replaced by `change(certificate)` (Plans are frozen; copies are cheap)."""
    if not any(listener.certificates for listener in p.listeners):
        return p
    listeners = tuple(
        listener.model_copy(update={"certificates": tuple(change(c) for c in listener.certificates)})
        for listener in p.listeners
    )
    return p.model_copy(update={"listeners": listeners})

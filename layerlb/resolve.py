"""`resolve(spec, view) -> Plan`: a validated LoadBalancer plus what the cluster knows, turned into a Plan.

Pure: everything outside the resource comes through a `View` (Service endpoints, TLS material, the
allocated VIP). The operator's view reads EndpointSlices and Secrets; `StaticView` serves standalone
files, where only static endpoints exist.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any, Protocol

from layerlb import api, plan, plan_contract
from layerlb.validation import Problem


class Unresolvable(Exception):
    """The resource is valid but refers to something missing; `reason` is the Accepted condition reason.

    Unlike invalid input this can heal by itself (the Service appears), so the operator retries it.
    """

    def __init__(self, reason: str, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(problem) for problem in problems))
        self.reason = reason
        self.problems = problems


class View(Protocol):
    """What `resolve` needs from outside the resource."""

    def service_endpoints(self, namespace: str, service: api.ServiceRef, path: str) -> list[plan.Endpoint]:
        """Ready endpoints of a Service port; raise `Unresolvable` when the Service is missing."""
        ...

    def certificate(self, namespace: str, secret_name: str, path: str) -> plan.Certificate:
        """The certificate in a TLS Secret; raise `Unresolvable` when it is missing or unusable."""
        ...

    def vip(self, resource: api.LoadBalancer) -> str:
        """The VIP allocated to this LoadBalancer; raise `Unresolvable` when none can be."""
        ...


def route_priority(route: plan.Route) -> tuple[int, int, int, int, int]:
    """Sort key of route specificity (higher first), after Gateway API's precedence.

    Host first (exact names over wildcards over any host), then an exact path, then the longest prefix,
    then methods, then the number of header matches; ties keep the declared order (sort is stable).
    """
    if not route.hosts:
        host_rank = 0
    elif any(not host.startswith("*.") for host in route.hosts):
        host_rank = 2
    else:
        host_rank = 1
    return (
        host_rank,
        1 if route.path is not None else 0,
        len(route.path_prefix.rstrip("/")) if route.path_prefix else -1,
        1 if route.methods else 0,
        len(route.headers),
    )


def _health(check: api.HealthCheck | None) -> plan.HealthCheck | None:
    if check is None:
        return None
    return plan.HealthCheck(
        protocol=check.protocol,
        path=check.path,
        port=check.port,
        interval_seconds=check.intervalSeconds,
        timeout_seconds=check.timeoutSeconds,
        healthy_threshold=check.healthyThreshold,
        unhealthy_threshold=check.unhealthyThreshold,
    )


def _endpoints(
    resource: api.LoadBalancer, backend: api.Backend, index: int, view: View
) -> tuple[plan.Endpoint, ...]:
    spec = resource.spec
    fixed_port = spec.architecture in (api.Architecture.dsr, api.Architecture.tunnel)
    if backend.service is not None:
        path = f"spec.backends[{index}].service"
        found = view.service_endpoints(resource.metadata.namespace or "default", backend.service, path)
        if fixed_port:
            found = [endpoint.model_copy(update={"port": None}) for endpoint in found]
    else:
        found = [
            plan.Endpoint(address=str(ipaddress.ip_address(e.address)), port=e.port, weight=e.weight)
            for e in backend.endpoints or []
        ]
    return tuple(sorted(found, key=lambda e: (ipaddress.ip_address(e.address).packed, e.port or 0)))


def resolve(resource: api.LoadBalancer, view: View) -> plan.Plan:
    """The Plan for one validated LoadBalancer; raise `Unresolvable` when a reference cannot be met."""
    spec = resource.spec
    namespace = resource.metadata.namespace or "default"
    problems: list[Problem] = []
    reason = ""

    def attempt(call: Any, *args: Any) -> Any:
        nonlocal reason
        try:
            return call(*args)
        except Unresolvable as error:
            problems.extend(error.problems)
            reason = reason or error.reason
            return None

    listeners = []
    proxy = spec.architecture in (api.Architecture.proxy, api.Architecture.transparent)
    for index, listener in enumerate(spec.listeners):
        certificates: list[plan.Certificate] = []
        if listener.tls is not None:
            names = [listener.tls.secretName, *(listener.tls.extraSecretNames or [])]
            for secret_index, secret in enumerate(names):
                path = f"spec.listeners[{index}].tls." + (
                    "secretName" if secret_index == 0 else f"extraSecretNames[{secret_index - 1}]"
                )
                certificate = attempt(view.certificate, namespace, secret, path)
                if certificate is not None:
                    certificates.append(certificate)
        accept = listener.acceptProxyProtocol
        listeners.append(
            plan.Listener(
                name=listener.name,
                port=listener.port,
                protocol=listener.protocol,
                transport=api.transport(listener.protocol),
                certificates=tuple(certificates),
                max_connections=listener.maxConnections,
                max_connections_per_client=(
                    (listener.maxConnectionsPerClient or api.PER_CLIENT_CONNECTIONS)
                    if proxy and api.transport(listener.protocol) == "TCP"
                    else None
                ),
                accept_proxy_protocol=(
                    plan.AcceptProxyProtocol(trusted_cidrs=tuple(accept.trustedCIDRs)) if accept else None
                ),
            )
        )

    backends = []
    for index, backend in enumerate(spec.backends):
        endpoints = attempt(_endpoints, resource, backend, index, view)
        hash_on = backend.hashOn or api.HashOn()
        backends.append(
            plan.Backend(
                name=backend.name,
                algorithm=backend.algorithm,
                hash_on=plan.HashOn(type=hash_on.type, name=hash_on.name),
                endpoints=endpoints or (),
                health_check=_health(backend.healthCheck),
                proxy_protocol=backend.proxyProtocol,
            )
        )

    vip = attempt(view.vip, resource)
    if problems:
        raise Unresolvable(reason, problems)

    routes = [
        plan.Route(
            hosts=tuple(host.lower() for host in route.match.hosts or []),
            path_prefix=route.match.pathPrefix,
            path=route.match.path,
            headers=tuple(
                sorted((name.lower(), value) for name, value in (route.match.headers or {}).items())
            ),
            methods=tuple(route.match.methods or []),
            backend=route.backend,
        )
        for route in spec.routes or []
    ]
    routes.sort(key=route_priority, reverse=True)
    default = spec.defaultBackend or (spec.backends[0].name if spec.mode is api.Mode.L4 else None)
    affinity = spec.sessionAffinity or api.SessionAffinity()
    timeouts = spec.timeouts or api.Timeouts()
    limits = spec.limits or api.Limits()
    kernel = spec.architecture in api.KERNEL_ARCHITECTURES
    return plan.Plan(
        name=resource.metadata.name,
        namespace=namespace,
        generation=resource.metadata.generation or 0,
        mode=spec.mode,
        architecture=spec.architecture,
        engine=(spec.engine or api.Engine.ipvs) if kernel else None,
        vip=str(ipaddress.ip_address(vip)),
        listeners=tuple(listeners),
        backends=tuple(backends),
        routes=tuple(routes),
        default_backend=default,
        session_affinity=plan.SessionAffinity(
            type=affinity.type, timeout_seconds=affinity.timeoutSeconds, cookie_name=affinity.cookieName
        ),
        timeouts=plan.Timeouts(
            connect=timeouts.connectSeconds,
            header=timeouts.headerSeconds,
            request=timeouts.requestSeconds,
            idle=timeouts.idleSeconds,
        ),
        limits=plan.Limits(max_request_line=limits.maxRequestLineBytes, max_header=limits.maxHeaderBytes),
    )


def certificate_names(cert_pem: str) -> tuple[str, ...]:
    """The DNS names a PEM certificate serves (subjectAltName, else CN), read with the `openssl` CLI.

    The data plane matches SNI against these; the stdlib cannot parse a certificate without a handshake.
    """
    try:
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-subject", "-nameopt", "multiline"],
            input=cert_pem,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    names = re.findall(r"DNS:([^,\s]+)", out)
    if not names:
        names = re.findall(r"commonName\s*=\s*(\S+)", out)
    return tuple(dict.fromkeys(name.lower() for name in names))


def _secret_field(secret: dict[str, Any], key: str) -> str | None:
    string_data = secret.get("stringData") or {}
    if isinstance(string_data, dict) and isinstance(string_data.get(key), str):
        return str(string_data[key])
    data = secret.get("data") or {}
    if isinstance(data, dict) and isinstance(data.get(key), str):
        try:
            return base64.b64decode(data[key], validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def certificate_from_secret(secret: dict[str, Any], path: str) -> plan.Certificate:
    """A Plan certificate from a `kubernetes.io/tls` Secret's `tls.crt` and `tls.key`."""
    name = (secret.get("metadata") or {}).get("name", "?")
    cert, key = _secret_field(secret, "tls.crt"), _secret_field(secret, "tls.key")
    if not cert or "BEGIN CERTIFICATE" not in cert or not key or "PRIVATE KEY" not in key:
        raise Unresolvable(
            "InvalidCertificate",
            [Problem(path, f"Secret {name} needs PEM tls.crt and tls.key (a kubernetes.io/tls Secret)")],
        )
    return plan.Certificate(
        source=plan_contract.secret_source(name), cert_pem=cert, key_pem=key, names=certificate_names(cert)
    )


@dataclass
class StaticView:
    """The view of standalone files: static endpoints only, Secrets from the same files, `spec.vip` as is."""

    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def service_endpoints(self, namespace: str, service: api.ServiceRef, path: str) -> list[plan.Endpoint]:
        raise Unresolvable(
            "BackendNotFound",
            [
                Problem(
                    path,
                    f"Service {service.name} cannot be resolved in a standalone file; "
                    "list the backend's endpoints instead, or run the operator",
                )
            ],
        )

    def certificate(self, namespace: str, secret_name: str, path: str) -> plan.Certificate:
        secret = self.secrets.get((namespace, secret_name))
        if secret is None:
            raise Unresolvable(
                "SecretNotFound",
                [
                    Problem(
                        path,
                        f"Secret {secret_name} not found; in a standalone file, add it as a "
                        "kubernetes.io/tls Secret document in the same files",
                    )
                ],
            )
        return certificate_from_secret(secret, path)

    def vip(self, resource: api.LoadBalancer) -> str:
        if resource.spec.vip is None:
            raise Unresolvable(
                "NoVIPAvailable",
                [Problem("spec.vip", "required in a standalone file (no VIPPool allocates one)")],
            )
        return resource.spec.vip

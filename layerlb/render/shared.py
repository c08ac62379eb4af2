"""What every render shares: the jinja2 templates and the header line, address spelling, the serving
backend, and the checks of what a format can hold (address families, repeated endpoints, kernel engines).

The kernel engines import this module and their own format's (`ipvs_rules`, `nftables_ruleset`), never
`haproxy_config`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import cache, lru_cache

import jinja2

from layerlb import api, plan


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("layerlb", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # plain-text configurations, not HTML
    )


def template(name: str) -> jinja2.Template:
    """A template of `templates/` (loaded once), strict about undefined names."""
    return _environment().get_template(name)


def header(p: plan.Plan) -> str:
    """The first comment line of every text render: whose configuration this is, and of which generation."""
    return f"layerlb {p.key} generation {p.generation}: {p.mode} {p.architecture}"


def serving_backend(p: plan.Plan) -> plan.Backend:
    """The backend of an L4 Plan: L4 has no routes, so everything goes to the default backend."""
    return p.backend(p.default_backend or p.backends[0].name)


@lru_cache(maxsize=65536)
def is_ipv6(address: str) -> bool:
    """Whether an address is IPv6: the family decides brackets, nftables families and match keywords.
    Cached: a Plan of 1,000 listeners x 10 endpoints asks 11,000 times, and parsing is most of the cost."""
    return ipaddress.ip_address(address).version == 6


def host_port(address: str, port: int) -> str:
    """`address:port`, with IPv6 addresses in brackets, as ipvsadm and HAProxy read them."""
    return f"[{address}]:{port}" if is_ipv6(address) else f"{address}:{port}"


def family_problem(p: plan.Plan, backends: Sequence[plan.Backend], fmt: str) -> str | None:
    """An endpoint of another address family than the VIP, which no kernel format can forward to."""
    vip_v6 = is_ipv6(p.vip)
    for backend in backends:
        for endpoint in backend.endpoints:
            if is_ipv6(endpoint.address) != vip_v6:
                index = p.backends.index(backend)
                family, vip_family = ("IPv6", "IPv4") if not vip_v6 else ("IPv4", "IPv6")
                return (
                    f"spec.backends[{index}].endpoints: format {fmt} cannot forward the {vip_family} VIP "
                    f"{p.vip} to the {family} endpoint {endpoint.address}; the kernel does not translate "
                    "between address families"
                )
    return None


def duplicate_problem(p: plan.Plan, backends: Sequence[plan.Backend], fmt: str) -> str | None:
    """An endpoint listed twice, which `fmt` cannot hold: IPVS refuses a second identical real server,
    HAProxy a second server of the same name. In IPVS a missing port is the listener's, so compare per port.
    """
    ports: list[int | None] = [None] if fmt == "haproxy" else [listener.port for listener in p.listeners]
    for backend in backends:
        for port in ports:
            targets = [(e.address, e.port or port) for e in backend.endpoints]
            repeated = next((target for target in targets if targets.count(target) > 1), None)
            if repeated is not None:
                address, target_port = repeated
                where = address if target_port is None else host_port(address, target_port)
                return (
                    f"spec.backends[{p.backends.index(backend)}].endpoints: format {fmt} cannot list the "
                    f"endpoint {where} twice; merge them into one whose weight is the sum"
                )
    return None


def kernel_unsupported(
    p: plan.Plan, fmt: str, engine: api.Engine, architectures: Sequence[api.Architecture]
) -> str | None:
    """Why a kernel format cannot render `p`: an architecture or engine it does not do, or endpoints it
    cannot hold; None when it can."""
    if p.architecture not in architectures:
        names = [str(a) for a in architectures]
        listed = ", ".join(names[:-1]) + f" and {names[-1]}"
        return f"spec.architecture: format {fmt} renders architectures {listed}, not {p.architecture}"
    if p.engine is not engine:
        return f"spec.engine: format {fmt} renders engine {engine}; this LoadBalancer uses {p.engine}"
    backends = [serving_backend(p)]
    duplicates = duplicate_problem(p, backends, fmt) if engine is api.Engine.ipvs else None
    return family_problem(p, backends, fmt) or duplicates

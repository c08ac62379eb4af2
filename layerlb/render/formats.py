"""The entry points of rendering: a Plan in, a text configuration out, in any format by name.

Formats: `dataplane` (the Plan as JSON, what the forwarding pod loads), `ipvs` (ipvsadm-restore rules),
`nftables` (an `nft -f` ruleset) and `haproxy` (haproxy.cfg). A format that cannot express a Plan says
why through `unsupported`, rather than rendering something that would forward differently.

The decisions (weight ranges, schedulers, ACLs, names) are small typed functions in each format's module
(`ipvs_rules`, `nftables_ruleset`, `haproxy_config`), so that they can be tested on their own; the
templates only lay out what these functions computed. Every output is deterministic: the same Plan and
keywords give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from layerlb import plan
from layerlb.render import haproxy_config, ipvs_rules, nftables_ruleset

FORMATS = ("dataplane", "ipvs", "nftables", "haproxy")


def unsupported(p: plan.Plan, fmt: str) -> str | None:
    """Why `fmt` cannot render `p` (a message naming the field), or None when it can."""
    if fmt == "dataplane":
        return None
    if fmt == "ipvs":
        return ipvs_rules.unsupported(p)
    if fmt == "nftables":
        return nftables_ruleset.unsupported(p)
    if fmt == "haproxy":
        return haproxy_config.unsupported(p)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def render(
    p: plan.Plan,
    fmt: str,
    *,
    cert_dir: str = haproxy_config.DEFAULT_CERT_DIR,
    device: str = nftables_ruleset.DEFAULT_DEVICE,
    device_mac: str | None = None,
    neighbours: Mapping[str, str] | None = None,
    masquerade: bool = False,
    comment: str | None = None,
) -> str:
    """The configuration of `p` in `fmt`; call `unsupported` first.

    Keywords a format does not use are ignored. haproxy: `cert_dir` holds one folder per HTTPS listener
    (see `haproxy_config.haproxy_certificates`). nftables dsr: `device` is the interface that receives VIP
    traffic and forwards it, `device_mac` its MAC address, `neighbours` the backends' MACs by IP address
    (the data plane knows them at sync time; without them the render holds placeholders). nftables nat:
    `masquerade` rewrites the source of balanced connections to this node's address, for backends that
    do not route replies back through it (the client address is then lost). nftables: `comment` is
    stored in the kernel as the table's comment (the nftables engine keeps a hash of the ruleset there,
    so a restarted data plane can tell that the kernel already holds what it would load).
    """
    reason = unsupported(p, fmt)
    if reason is not None:
        raise ValueError(reason)
    if fmt == "dataplane":
        return dataplane(p)
    if fmt == "ipvs":
        return ipvs_rules.ipvs(p)
    if fmt == "nftables":
        return nftables_ruleset.nftables(
            p,
            device=device,
            device_mac=device_mac,
            neighbours=neighbours,
            masquerade=masquerade,
            comment=comment,
        )
    return haproxy_config.haproxy(p, cert_dir=cert_dir)


def dataplane(p: plan.Plan) -> str:
    """The Plan as JSON with sorted keys: stable, so an unchanged Plan gives an unchanged ConfigMap."""
    return json.dumps(p.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

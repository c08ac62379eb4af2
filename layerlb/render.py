"""Renderers: a Plan in, a text configuration out, through the jinja2 templates in `templates/`.

Formats: `dataplane` (the Plan as JSON, what the forwarding pod loads), `ipvs` (ipvsadm-restore rules),
`nftables` (an `nft -f` ruleset) and `haproxy` (haproxy.cfg). A format that cannot express a Plan says
why through `unsupported`, rather than rendering something that would forward differently.
"""

from __future__ import annotations

import json

from layerlb import plan

FORMATS = ("dataplane", "ipvs", "nftables", "haproxy")


def unsupported(p: plan.Plan, fmt: str) -> str | None:
    """Why `fmt` cannot render `p` (a message naming the field), or None when it can."""
    if fmt == "dataplane":
        return None
    raise NotImplementedError(fmt)


def render(p: plan.Plan, fmt: str) -> str:
    """The configuration of `p` in `fmt`; call `unsupported` first."""
    if fmt == "dataplane":
        return dataplane(p)
    raise NotImplementedError(fmt)


def dataplane(p: plan.Plan) -> str:
    """The Plan as JSON with sorted keys: stable, so an unchanged Plan gives an unchanged ConfigMap."""
    return json.dumps(p.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

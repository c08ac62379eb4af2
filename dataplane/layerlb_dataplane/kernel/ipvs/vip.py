"""The VIP on the node: the IPVS engine adds it where the architecture needs it, and removes only its own.

**The VIP address** is added where the architecture needs it, as a host address (/32, /128):
`nat` on `lo` (IPVS takes packets for local addresses; the node answers ARP for it with the default
`arp_ignore=0`), `dsr` and `tunnel` on the LB's interface (`device`, else the interface the route to the
VIP leaves by), where the LB must answer ARP for the VIP on the clients' segment. IPv4 addresses carry
the label `<device>:llb`, so that `remove` deletes only an address the engine added (IPv6 has no labels:
`remove` deletes the VIP's /128). A VIP that is already local is left as it is.

**Strict ARP** (`strict_arp=True`, what a forwarding pod gets from the operator): the L2 speaker answers
ARP/NDP for the VIP from one elected node, so no node's kernel may answer for it too. Every architecture
then puts the VIP on `lo` (IPVS takes packets for any local address, as kube-proxy's IPVS mode does with
its dummy interface) and, for an IPv4 VIP, `strict_arp.check` sets `arp_ignore=1` / `arp_announce=2`
before the VIP is added; a node where that cannot be done is reported in `SyncReport.warnings`. An address
on an interface would be answered by that interface's kernel whatever `arp_ignore` says, so `dsr` and
`tunnel` leave the interface only here: standalone (no speaker) they keep needing the kernel's answer.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from typing import Final, Protocol

from layerlb import api
from layerlb import plan as plan_model
from layerlb.render import shared
from layerlb_dataplane.kernel import addresses
from layerlb_dataplane.kernel import strict_arp as strict_arp_module
from layerlb_dataplane.kernel.ipvs import table

log = logging.getLogger("layerlb.kernel.ipvs")

VIP_LABEL_SUFFIX: Final = ":llb"
IFNAME_MAX: Final = 15


@dataclass(frozen=True)
class Placed:
    """What placing a VIP did: how many changes it made, and what the node lacks (strict ARP's warning)."""

    changes: int
    warnings: tuple[str, ...] = ()


class VipAddresses(Protocol):
    """Puts a Plan's VIP on the node, and takes it off again."""

    def ensure(self, plan: plan_model.Plan, vip: str) -> Placed:
        """Makes `vip` an address of this node where `plan`'s architecture needs it (no change when it is)."""
        ...

    def remove(self, vip: str) -> None:
        """Takes `vip` off the node, where the engine had put it."""
        ...


class NodeVipAddresses:
    """The VIP as a host address (/32, /128) set with `ip`, in the calling thread's network namespace.

    `device` (dsr, tunnel): the interface that gets the VIP, instead of the one the route to the VIP
    leaves by. `strict_arp`: the speaker answers for the VIP, so it goes on `lo` and the node stops
    answering ARP.
    """

    def __init__(self, *, device: str | None = None, strict_arp: bool = False) -> None:
        self.device = device
        self.strict_arp = strict_arp_module.StrictArp() if strict_arp else None

    def ensure(self, plan: plan_model.Plan, vip: str) -> Placed:
        changes = 0
        warnings: tuple[str, ...] = ()
        if self.strict_arp is not None and not shared.is_ipv6(vip):  # before the VIP is there to answer
            checked = self.strict_arp.check()
            changes += checked.changes
            warnings = (checked.warning,) if checked.warning else ()
        changes += self._add(plan, vip)
        return Placed(changes, warnings)

    def remove(self, vip: str) -> None:
        """Deletes the VIP's host address where the engine added it (see the module docstring)."""
        v6 = shared.is_ipv6(vip)
        host = 128 if v6 else 32
        for link in addresses.ip_json("addr", "show", "to", f"{vip}/{host}"):
            device = str(link.get("ifname", ""))
            for info in addresses.infos(link):
                if info.get("local") is None or table.canonical(str(info["local"])) != vip:
                    continue
                if info.get("prefixlen") != host:
                    continue
                label = str(info.get("label", ""))
                ours = (
                    v6 or label.endswith(VIP_LABEL_SUFFIX) or len(device) + len(VIP_LABEL_SUFFIX) > IFNAME_MAX
                )
                if ours:
                    _ip("-6" if v6 else "-4", "addr", "del", f"{vip}/{host}", "dev", device)

    def _device(self, plan: plan_model.Plan, vip: str) -> str:
        if plan.architecture is api.Architecture.nat or self.strict_arp is not None:
            return "lo"
        if self.device is not None:
            return self.device
        routes = addresses.ip_json("route", "get", vip)
        if not routes or not routes[0].get("dev"):
            raise ValueError(
                f"{plan.key}: no route to the VIP {vip} tells which interface should own it; give the engine a device"
            )
        return str(routes[0]["dev"])

    def _add(self, plan: plan_model.Plan, vip: str) -> int:
        if addresses.is_local(vip):
            return 0
        device = self._device(plan, vip)
        if shared.is_ipv6(vip):
            done = _ip("-6", "addr", "add", f"{vip}/128", "dev", device, "nodad")
        else:
            label = f"{device}{VIP_LABEL_SUFFIX}"
            extra = ["label", label] if len(label) <= IFNAME_MAX else []
            done = _ip("addr", "add", f"{vip}/32", "dev", device, *extra)
        if done.returncode != 0 and "File exists" not in done.stderr:
            raise OSError(f"adding the VIP {vip} to {device}: {done.stderr.strip()}")
        if device == "lo":
            _ip("link", "set", "lo", "up")
        log.info("%s: VIP %s added to %s", plan.key, vip, device)
        return 1


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)

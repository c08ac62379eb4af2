"""In-memory stand-ins for the IPVS engine's kernel interfaces (`kernel.IpvsKernel`, `vip.VipAddresses`), so
its diff and drain logic is tested on this machine, whose kernel has no IPVS.

`FakeIpvs` keeps a table as the kernel would after the same commands: it refuses what IPVS refuses
(a service or real server that exists or does not), keeps the connection counts a test sets, and
fingerprints only what /proc/net/ip_vs shows (no scheduler flags), like the real one. A real server
is added at the head of its service's list, as the kernel adds it (the order `sh` and `mh` build from). The connection
entries are /proc/net/ip_vs_conn text, parsed by the engine's own parser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from layerlb_dataplane.kernel.ipvs import kernel, proc, table, vip

from layerlb import plan as plan_model

CONNECTION_HEADER = "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"


class FakeIpvs:
    """An IPVS table in memory, changed by the engine's batches and read back as the kernel would give it."""

    def __init__(self) -> None:
        self.services_by_key: dict[table.ServiceKey, table.VirtualService] = {}
        self.connection_table = CONNECTION_HEADER  # /proc/net/ip_vs_conn
        self.sysctls: dict[str, str] = {}
        self.batches: list[list[str]] = []  # every batch applied, as ipvsadm lines
        self.refuse: dict[str, str] = {}  # verb -> the reason the kernel gives for it

    # --- what a test arranges and reads ----------------------------------------------------------------

    def server(self, key: table.ServiceKey, address: str, port: int) -> table.RealServer:
        """The kernel's real server (its counts may be set by the test)."""
        return self.services_by_key[key].servers[(address, port)]

    def lines(self, address: str | None = None) -> list[str]:
        """The table as ipvsadm would save it (`-A` and `-a` lines), sorted: a whole, normalised dump."""
        found: list[str] = []
        for key, service in sorted(self.services_by_key.items()):
            if address is not None and key.address != address:
                continue
            found.append(f"-A {service.definition()}")
            found += sorted(f"-a {key.option} {server.option()}" for server in service.servers.values())
        return found

    def written(self) -> list[str]:
        """Every change written so far, in order."""
        return [line for batch in self.batches for line in batch]

    # --- kernel.IpvsKernel -----------------------------------------------------------------------------

    def services(self, vip: str) -> list[table.VirtualService]:
        return [
            dataclasses.replace(service, servers={})
            for key, service in sorted(self.services_by_key.items())
            if key.address == vip
        ]

    def read(self, vip: str) -> kernel.Reading:
        services = {
            key: dataclasses.replace(
                service, servers={k: dataclasses.replace(s) for k, s in service.servers.items()}
            )
            for key, service in self.services_by_key.items()
            if key.address == vip
        }
        return kernel.Reading(services, self.fingerprint(vip))

    def fingerprint(self, vip: str) -> tuple[str, ...]:
        found: list[str] = []
        for key, service in sorted(self.services_by_key.items()):
            if key.address != vip:
                continue
            persistence = "" if service.persistence is None else f" persistent {service.persistence}"
            found.append(f"{key.option} {service.scheduler}{persistence}")  # /proc shows no scheduler flags
            found += sorted(f"  -> {s.target} {s.forward} {s.weight}" for s in service.servers.values())
        return tuple(found)

    def apply(self, changes: Sequence[table.Change]) -> list[table.Refusal]:
        self.batches.append([str(change) for change in changes])
        refused: list[table.Refusal] = []
        for index, change in enumerate(changes):
            reason = self.refuse.get(change.verb) or self._change(change)
            if reason is not None:
                refused.append(table.Refusal(index, reason))
        return refused

    def live_connections(self) -> set[table.ConnectionKey]:
        return proc.live_connections(self.connection_table)

    def set_sysctl(self, name: str, value: str) -> bool:
        changed = self.sysctls.get(name) != value
        self.sysctls[name] = value
        return changed

    def _change(self, change: table.Change) -> str | None:
        """Makes one change as IPVS would; the kernel's reason when it would refuse it."""
        services = self.services_by_key
        have = services.get(change.key)
        if change.verb == "-A":
            if have is not None:
                return "already exists"
            assert change.service is not None
            services[change.key] = dataclasses.replace(change.service, servers={})
            return None
        if have is None:
            return "no such service"
        if change.verb == "-E":
            assert change.service is not None
            services[change.key] = dataclasses.replace(change.service, servers=have.servers)
        elif change.verb == "-D":
            del services[change.key]
        else:
            assert change.server is not None
            server = have.servers.get(change.server.key)
            if change.verb == "-a":
                if server is not None:
                    return "already exists"
                added = dataclasses.replace(change.server, active=0, inactive=0)
                have.servers = {added.key: added, **have.servers}  # at the head, as the kernel adds it
            elif server is None:
                return "no such destination, or scheduler/persistence engine not found"
            elif change.verb == "-e":
                server.forward, server.weight = change.server.forward, change.server.weight
            else:
                del have.servers[change.server.key]
        return None


class FakeVips:
    """VIP addresses in memory: which VIPs the node has, and what the engine added and removed."""

    def __init__(self) -> None:
        self.local: set[str] = set()
        self.removed: list[str] = []

    def ensure(self, plan: plan_model.Plan, address: str) -> vip.Placed:
        if address in self.local:
            return vip.Placed(0)
        self.local.add(address)
        return vip.Placed(1)

    def remove(self, address: str) -> None:
        self.local.discard(address)
        self.removed.append(address)

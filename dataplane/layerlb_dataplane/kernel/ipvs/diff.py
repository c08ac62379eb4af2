"""The changes that turn the kernel's IPVS table into the desired one, and the drain of what leaves it.

**Desired state.** A sync reads the kernel's table, computes the difference to the Plan, and writes
only that: `-A`/`-E` (scheduler, flags, persistence) for services, `-a`/`-e`/`-d` for real servers, `-D`
for services gone. Applying the same Plan twice writes nothing. Only services on the Plan's VIP are
compared (the engine owns its VIP, and nothing else).

**Drain.** A real server gone from the Plan (or whose target is `draining`) is first set to weight 0,
then deleted (`-d`) once its connections have ended: when IPVS counts no active and no inactive
connection for it, or, for TCP, when every connection entry left for it (`/proc/net/ip_vs_conn`) is in
TIME_WAIT or CLOSE — connections that are over but that IPVS keeps for up to two minutes and that
deleting the server cannot disturb. After `drain_seconds` it is deleted anyway. UDP flows count as
inactive until IPVS expires them (its UDP timeout), so a UDP drain usually ends by `drain_seconds`.
A listener gone from the Plan drains the same way, and its service is deleted when its last server is.
A drain progresses on each sync; the difference says when to sync again while one is pending.

**Order, for the hashing schedulers.** `sh` and `mh` build their lookup table by walking the service's
real servers in the order of the kernel's list, and the kernel puts a server it adds at the head of that
list (which /proc/net/ip_vs and the dump show first). Two nodes holding the same servers in a different
order build different tables and send some flows to different backends, which undoes what `dsr` and
`tunnel` schedule with Maglev for (a flow moved to another node by ECMP must keep its backend). So for
these schedulers the difference keeps the list in the render's order (the Plan's, sorted by address):
a server added after servers it sorts before is added together with those, which are deleted and added
again in the same batch (IPVS takes a deleted server back from its trash with its connections, so
they carry on). A node that started with the whole set and one that saw it grow then agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, MutableMapping
from typing import Final

from layerlb_dataplane.kernel.ipvs import table

DRAIN_POLL_SECONDS: Final = 1.0
# Schedulers whose table depends on the order of the kernel's list of real servers.
ORDERED_SCHEDULERS: Final = frozenset({"sh", "mh"})

DrainMark = tuple[table.ServiceKey, table.ServerKey]  # a real server of a service, draining


def difference(
    desired: Mapping[table.ServiceKey, table.VirtualService],
    owned: Mapping[table.ServiceKey, table.VirtualService],
    *,
    vip: str,
    method: str,
    now: float,
    drain_seconds: float,
    draining: MutableMapping[DrainMark, float],
    connections: Callable[[], set[table.ConnectionKey]],
) -> tuple[list[table.Change], float | None]:
    """The changes that turn `owned` (the kernel's services on `vip`) into `desired`, and when a pending
    drain wants a sync (None: no drain pending).

    `method` is the Plan's forwarding option (`-m`, `-g`, `-i`); `draining` says since when each real
    server drains, kept by the caller from one sync to the next and updated here; `connections` reads the
    kernel's connection entries that are not over (called only when a drain needs them).
    """
    drains = Drains(now, method, drain_seconds, draining, connections)
    commands: list[table.Change] = []
    for key, want in desired.items():
        have = owned.get(key)
        if have is None:
            commands.append(table.Change("-A", key, want))
            commands += [table.Change("-a", key, server=server) for server in want.servers.values()]
            continue
        if have.settings != want.settings:
            commands.append(table.Change("-E", key, want))
        moved = out_of_order(want, have) if want.scheduler in ORDERED_SCHEDULERS else []
        commands += [table.Change("-d", key, server=have.servers[k]) for k in moved]
        readded = set(moved)
        for server_key, server in want.servers.items():
            if draining:
                draining.pop((key, server_key), None)
            current = have.servers.get(server_key)
            if current is None or server_key in readded:
                continue
            if current.weight != server.weight or current.forward not in (server.forward, table.LOCAL):
                commands.append(table.Change("-e", key, server=server))
        added = [k for k in want.servers if k in readded or k not in have.servers]
        commands += [table.Change("-a", key, server=want.servers[k]) for k in added]
        for server_key, current in have.servers.items():
            if server_key not in want.servers:
                commands += drains.step(key, current)
    for key, have in owned.items():
        if key in desired:
            continue
        steps = [change for current in have.servers.values() for change in drains.step(key, current)]
        if all(change.verb == "-d" for change in steps) and drains.waiting(key) == 0:
            commands.append(table.Change("-D", key))  # every server is drained: the service goes with them
        else:
            commands += steps
    for mark in [m for m in draining if m[0].address == table.canonical(vip) and m not in drains.seen]:
        del draining[mark]  # gone from the kernel by other means
    return commands, drains.next_sync()


def out_of_order(want: table.VirtualService, have: table.VirtualService) -> list[table.ServerKey]:
    """The wanted real servers that the kernel holds out of the render's order, to delete and add again
    (with the ones it lacks, added after them) so that its list ends in that order.

    The kernel's list reversed is the order of addition; the servers of `have` that `want` keeps must
    begin `want`'s order, and everything from the first that does not is added again.
    """
    added_order = [k for k in reversed(have.servers) if k in want.servers]
    wanted = list(want.servers)
    agreed = 0
    while agreed < len(added_order) and added_order[agreed] == wanted[agreed]:
        agreed += 1
    return [k for k in wanted[agreed:] if k in have.servers]


def finished(key: table.ServiceKey, server: table.RealServer, live: set[table.ConnectionKey]) -> bool:
    """Whether a drained real server carries no connection that is not over (see the module docstring)."""
    if server.active + server.inactive == 0:
        return True
    if key.protocol != "TCP" or server.active > 0:
        return False
    return (key.protocol, key.address, key.port, server.address, server.port) not in live


class Drains:
    """One sync's view of draining real servers: which step each takes, and when to look again."""

    def __init__(
        self,
        now: float,
        method: str,
        drain_seconds: float,
        since: MutableMapping[DrainMark, float],
        connections: Callable[[], set[table.ConnectionKey]],
    ) -> None:
        self.now = now
        self.method = method
        self.drain_seconds = drain_seconds
        self.since = since
        self.connections = connections
        self.seen: set[DrainMark] = set()
        self._waiting: dict[table.ServiceKey, int] = {}
        self._ends: list[float] = []
        self._live: set[table.ConnectionKey] | None = None

    def step(self, key: table.ServiceKey, server: table.RealServer) -> list[table.Change]:
        """Weight 0 first; `-d` once its connections are over or its drain time is up; else wait."""
        mark = (key, server.key)
        self.seen.add(mark)
        since = self.since.setdefault(mark, self.now)
        if server.weight != 0:
            self._wait(key, since)
            forward = self.method if server.forward == table.LOCAL else server.forward
            return [table.Change("-e", key, server=dataclasses.replace(server, forward=forward, weight=0))]
        if self.now - since >= self.drain_seconds or finished(key, server, self.live()):
            del self.since[mark]
            self.seen.discard(mark)
            return [table.Change("-d", key, server=server)]
        self._wait(key, since)
        return []

    def waiting(self, key: table.ServiceKey) -> int:
        return self._waiting.get(key, 0)

    def live(self) -> set[table.ConnectionKey]:
        if self._live is None:
            self._live = self.connections()
        return self._live

    def next_sync(self) -> float | None:
        if not self._ends:
            return None
        return min(self.now + DRAIN_POLL_SECONDS, min(self._ends))

    def _wait(self, key: table.ServiceKey, since: float) -> None:
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self._ends.append(since + self.drain_seconds)

"""What the IPVS engine needs of the kernel (`IpvsKernel`), and the running kernel behind it (`NetlinkIpvs`).

The engine computes; this interface reads and writes, so the diff and drain logic runs against a fake
table in unit tests (`tests/kernel/fake_ipvs.py`) and against the real kernel in the QEMU guest. It is
what the engine asks of IPVS and no more: the services on a VIP (their settings), the table with real
servers and their connection counts, a cheap fingerprint of that table for the no-op fast path, a
batch of changes, the connection entries that are not over (for drains), and a sysctl.

`NetlinkIpvs` reads the services with one generic netlink dump (`netlink`), their real servers from
`/proc/net/ip_vs` (`proc`: the kernel's own listing, no dump per service), writes a sync's changes in a
few batched `sendmsg` calls, and reads the connection entries from `/proc/net/ip_vs_conn`. Its socket is
opened for each call, in the network namespace of the calling thread.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from layerlb_dataplane.kernel.ipvs import netlink, proc, table

CONNECTION_TABLES: Final = ("/proc/thread-self/net/ip_vs_conn", "/proc/net/ip_vs_conn")
SERVICE_TABLES: Final = ("/proc/thread-self/net/ip_vs", "/proc/net/ip_vs")


@dataclass(frozen=True)
class Reading:
    """The TCP and UDP services on a VIP with their real servers' weights and connection counts, and the
    fingerprint of what was read (equal fingerprints: nothing layerlb programs there changed)."""

    services: dict[table.ServiceKey, table.VirtualService]
    fingerprint: tuple[str, ...]


class IpvsKernel(Protocol):
    """The IPVS table of one network namespace, as the engine reads and writes it."""

    def services(self, vip: str) -> list[table.VirtualService]:
        """The TCP and UDP services on `vip` with their settings (scheduler, flags, persistence, extra),
        without real servers: what the fast path checks that the fingerprint does not show."""
        ...

    def read(self, vip: str) -> Reading:
        """The TCP and UDP services on `vip` with their real servers, and the fingerprint of them."""
        ...

    def fingerprint(self, vip: str) -> tuple[str, ...]:
        """What `read` would fingerprint, read cheaply: services, schedulers, persistence, real servers,
        methods and weights, without connection counts (and without what it cannot show)."""
        ...

    def apply(self, changes: Sequence[table.Change]) -> list[table.Refusal]:
        """Makes `changes` in order; a refused one does not stop the others. Returns the refused ones.
        Raises IpvsError when IPVS cannot be reached at all."""
        ...

    def live_connections(self) -> set[table.ConnectionKey]:
        """The connection entries that are not over (not TIME_WAIT, CLOSE, or a persistence template)."""
        ...

    def set_sysctl(self, name: str, value: str) -> bool:
        """Sets /proc/sys/`name` (`net/ipv4/ip_forward`) to `value`; True when it changed."""
        ...


class NetlinkIpvs:
    """IPVS of the calling thread's network namespace, through generic netlink and /proc."""

    def services(self, vip: str) -> list[table.VirtualService]:
        with _connect() as socket:
            entries = socket.services(vip)
        return [service_from_entry(entry) for entry in entries]

    def read(self, vip: str) -> Reading:
        with _connect() as socket:
            entries = socket.services(vip)
        listing = _read_first(SERVICE_TABLES)
        servers = proc.servers(listing, vip)
        services: dict[table.ServiceKey, table.VirtualService] = {}
        for entry in entries:
            service = service_from_entry(entry)
            service.servers = servers.get(service.key, {})
            services[service.key] = service
        return Reading(services, proc.fingerprint(listing, vip))

    def fingerprint(self, vip: str) -> tuple[str, ...]:
        return proc.fingerprint(_read_first(SERVICE_TABLES), vip)

    def apply(self, changes: Sequence[table.Change]) -> list[table.Refusal]:
        with _connect() as socket:
            failures = socket.apply([request(change) for change in changes])
        return [table.Refusal(failure.index, failure.reason) for failure in failures]

    def live_connections(self) -> set[table.ConnectionKey]:
        return proc.live_connections(_read_first(CONNECTION_TABLES))

    def set_sysctl(self, name: str, value: str) -> bool:
        path = f"/proc/sys/{name}"
        with open(path) as file:
            if file.read().strip() == value:
                return False
        with open(path, "w") as file:
            file.write(value + "\n")
        return True


def service_from_entry(entry: netlink.ServiceEntry) -> table.VirtualService:
    """A service of the netlink dump in the engine's terms: persistence from its flag and timeout, the
    scheduler flags by ipvsadm's names, and in `extra` what layerlb never sets (`ops`, a persistence
    mask other than one client address, a persistence engine), so a hand edit of them is seen."""
    key = table.ServiceKey(entry.protocol, table.canonical(entry.address), entry.port)
    persistent = bool(entry.flags & netlink.F_PERSISTENT)
    extra: list[str] = []
    if entry.flags & netlink.F_ONEPACKET:
        extra.append("ops")
    if persistent and entry.netmask != netlink.default_netmask(key.address):
        extra += ["mask", entry.netmask.hex()]
    if entry.pe:
        extra += ["pe", entry.pe]
    flags = netlink.scheduler_flag_names(entry.scheduler, entry.flags)
    return table.VirtualService(
        key, entry.scheduler, entry.timeout if persistent else None, flags, tuple(extra)
    )


def request(change: table.Change) -> netlink.Request:
    """The netlink message of a change."""
    command = CHANGE_COMMANDS[change.verb]
    if change.service is not None:
        service = change.service
        return netlink.Request(
            command, _service_attr(change.key, service.scheduler, service.flags, service.persistence)
        )
    if change.server is None:
        return netlink.Request(command, _service_attr(change.key))
    server = change.server
    if change.verb == "-d":
        return netlink.Request(command, _service_attr(change.key) + _dest_attr(server.address, server.port))
    dest = _dest_attr(server.address, server.port, server.forward, server.weight)
    return netlink.Request(command, _service_attr(change.key) + dest)


CHANGE_COMMANDS: Final = {
    "-A": netlink.CMD_NEW_SERVICE,
    "-E": netlink.CMD_SET_SERVICE,
    "-D": netlink.CMD_DEL_SERVICE,
    "-a": netlink.CMD_NEW_DEST,
    "-e": netlink.CMD_SET_DEST,
    "-d": netlink.CMD_DEL_DEST,
}


@functools.lru_cache(maxsize=65536)
def _service_attr(
    key: table.ServiceKey,
    scheduler: str | None = None,
    flags: str | None = None,
    persistence: int | None = None,
) -> bytes:
    """The service attribute of a request: identity only, or a full entry when `scheduler` is given.
    Cached: every real server of a service repeats it."""
    identity = netlink.service_identity(key.protocol, key.address, key.port)
    if scheduler is None:
        return netlink.nested(netlink.CMD_ATTR_SERVICE, identity)
    bits = netlink.scheduler_flag_bits(scheduler, flags)
    if persistence is not None:
        bits |= netlink.F_PERSISTENT
    settings = netlink.service_settings(
        scheduler, bits, persistence or 0, netlink.default_netmask(key.address)
    )
    return netlink.nested(netlink.CMD_ATTR_SERVICE, identity, settings)


@functools.lru_cache(maxsize=65536)
def _dest_attr(address: str, port: int, forward: str | None = None, weight: int | None = None) -> bytes:
    return netlink.nested(netlink.CMD_ATTR_DEST, netlink.dest_attrs(address, port, forward, weight))


def _connect() -> netlink.IpvsNetlink:
    """A netlink socket to IPVS in the calling thread's network namespace."""
    try:
        return netlink.IpvsNetlink()
    except OSError as error:
        raise table.IpvsError(f"IPVS is not reachable: {error.strerror or error}") from error


def _read_first(paths: Sequence[str]) -> str:
    """The first of `paths` that exists (/proc/thread-self/net follows the thread's namespace; older
    kernels only have /proc/net)."""
    for path in paths:
        try:
            with open(path) as file:
                return file.read()
        except FileNotFoundError:
            continue
    return ""

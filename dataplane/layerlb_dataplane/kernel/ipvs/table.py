"""IPVS's table in layerlb's terms: virtual services, their real servers, and the changes between two tables.

Services and real servers are spelled as ipvsadm and the render spell them (`-t 192.0.2.10:80`,
`-r 10.0.2.11:8080 -m -w 2`), so a change is logged and reported as an ipvsadm line that an operator can
read and replay (`Change`), and a refused one with its line and the kernel's reason (`IpvsError`).
Addresses are compared in one spelling (`canonical`).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Final

from layerlb.render import shared

LOCAL: Final = "LOCAL"  # /proc's "Local": the real server is this node; the kernel chose the method
FORWARD_FLAGS: Final = {"Masq": "-m", "Route": "-g", "Tunnel": "-i", "Local": LOCAL}

ServerKey = tuple[str, int]  # (address, port) of a real server
ConnectionKey = tuple[str, str, int, str, int]  # (protocol, VIP, port, real server, port)


class IpvsError(RuntimeError):
    """IPVS refused changes or cannot be reached; the message names each change in ipvsadm's words and the
    kernel's reason."""


@dataclass(frozen=True, order=True)
class ServiceKey:
    """A virtual service as IPVS identifies it: protocol, address (canonical form) and port."""

    protocol: str  # "TCP" or "UDP"
    address: str
    port: int

    @property
    def option(self) -> str:
        """`-t 192.0.2.10:80`: how ipvsadm names the service."""
        flag = "-u" if self.protocol == "UDP" else "-t"
        return f"{flag} {shared.host_port(self.address, self.port)}"


@dataclass
class RealServer:
    """A real server of a virtual service; the counts are the kernel's (0 in a desired state)."""

    address: str
    port: int
    forward: str  # "-m", "-g", "-i", or LOCAL (read from the kernel only)
    weight: int
    active: int = 0
    inactive: int = 0

    @property
    def key(self) -> ServerKey:
        return (self.address, self.port)

    @property
    def target(self) -> str:
        """`-r 10.0.2.11:8080`."""
        return f"-r {shared.host_port(self.address, self.port)}"

    def option(self, *, forward: str | None = None, weight: int | None = None) -> str:
        """`-r 10.0.2.11:8080 -m -w 2`, the render's own spelling."""
        method = forward or self.forward
        return f"{self.target} {method} -w {self.weight if weight is None else weight}"


@dataclass
class VirtualService:
    """A virtual service with its real servers: one listener of a Plan, or one the kernel holds."""

    key: ServiceKey
    scheduler: str
    persistence: int | None
    flags: str | None = None  # scheduler flags, `-b`: sh-fallback, mh-fallback
    extra: tuple[str, ...] = ()  # what the kernel shows that layerlb never sets (ops, mask, pe, ...)
    servers: dict[ServerKey, RealServer] = field(default_factory=dict)

    @property
    def settings(self) -> tuple[str, str | None, int | None, tuple[str, ...]]:
        """What `-E` sets: two services with equal settings need no edit."""
        return (self.scheduler, self.flags, self.persistence, self.extra)

    def definition(self) -> str:
        """`-t VIP:80 -s wrr -p 600`, as the render writes it after `-A` (with `-b FLAGS` when set)."""
        flags = "" if self.flags is None else f" -b {self.flags}"
        persistence = "" if self.persistence is None else f" -p {self.persistence}"
        return f"{self.key.option} -s {self.scheduler}{flags}{persistence}"


@dataclass(frozen=True, slots=True)
class Change:
    """One change a sync makes, named by ipvsadm's option: `-A`/`-E`/`-D` a service, `-a`/`-e`/`-d` a real
    server. `str()` is the ipvsadm line (for logs and errors)."""

    verb: str
    key: ServiceKey
    service: VirtualService | None = None  # -A, -E
    server: RealServer | None = None  # -a, -e, -d

    def __str__(self) -> str:
        if self.service is not None:
            return f"{self.verb} {self.service.definition()}"
        if self.server is None:
            return f"{self.verb} {self.key.option}"
        if self.verb == "-d":
            return f"-d {self.key.option} {self.server.target}"
        return f"{self.verb} {self.key.option} {self.server.option()}"


@dataclass(frozen=True)
class Refusal:
    """A change of a batch that the kernel refused: its index in the batch and the kernel's reason."""

    index: int
    reason: str


@functools.lru_cache(maxsize=65536)
def canonical(address: str) -> str:
    """The one spelling of an address that the Plan, ipvsadm and /proc are compared in."""
    return ipaddress.ip_address(address).compressed


@functools.lru_cache(maxsize=65536)
def split_host_port(text: str) -> tuple[str, int]:
    """`10.0.0.1:80` or `[2001:db8::1]:80` (ipvsadm's and the render's form) -> (address, port)."""
    host, _, port = text.rpartition(":")
    return canonical(host.strip("[]")), int(port)


def parse_server_option(text: str) -> RealServer:
    """The render's `-r ADDRESS:PORT -m -w WEIGHT` -> a RealServer."""
    return RealServer(*_server_fields(text))


@functools.lru_cache(maxsize=65536)
def _server_fields(text: str) -> tuple[str, int, str, int]:
    """Cached: the listeners of a Plan repeat the same real servers."""
    words = text.split()
    if len(words) != 5 or words[0] != "-r" or words[3] != "-w":
        raise ValueError(f"unexpected real server in the ipvs render: {text!r}")
    address, port = split_host_port(words[1])
    return address, port, words[2], int(words[4])


@functools.lru_cache(maxsize=65536)
def parse_service_option(text: str) -> ServiceKey:
    """The render's `-t ADDRESS:PORT` (or `-u`) -> a ServiceKey."""
    flag, _, host_port = text.partition(" ")
    if flag not in ("-t", "-u"):
        raise ValueError(f"unexpected virtual service in the ipvs render: {text!r}")
    address, port = split_host_port(host_port)
    return ServiceKey("TCP" if flag == "-t" else "UDP", address, port)

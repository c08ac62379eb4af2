"""BIRD 2's side of the speaker (pure): `bgp.Desired` → bird.conf, and birdc's replies → each session's state.

The configuration comes from one jinja2 template (`templates/bird.conf.j2`, golden-tested): the node's
prefixes as blackhole static routes that no kernel protocol ever installs, and one `protocol bgp` per
peer whose export filter passes exactly that peer's prefixes with their communities and local preference.
Every prefix is in the static protocols whatever peer it goes to, so a change of what is announced is a
change of static routes and filters only: `birdc configure` then re-exports (sending UPDATEs) without
restarting any session. A change of a session's own options (timers, password, addresses) restarts that
session alone, as BIRD does.

`sessions` reads `birdc show protocols all` (and `show bfd sessions`) into one `SessionState` per BGP
protocol: the RFC 4271 state, since when, BIRD's last error ("Received: Bad peer AS", "Error: Hold timer
expired", "Socket: Connection refused", or `NO_CONNECTION` where BIRD says nothing), the prefixes exported and the BFD session's state, which is what
a BGPPeer's `status.nodes[]` entry holds.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from layerlb.render import shared
from layerlb_speaker import bgp

STATES = ("Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established")
# BIRD records no error while its TCP connects go unanswered: what a wrong TCP-MD5 password looks like
# (both kernels drop the other's segments), as does a filter or a router without this neighbour.
NO_CONNECTION = (
    "no TCP connection with the router: connects go unanswered "
    "(a TCP-MD5 password mismatch, a filter, or a router not configured for this node)"
)
BFD_STATES = {"up": "Up", "down": "Down", "init": "Init", "admindown": "AdminDown"}


def protocol(peer: str) -> str:
    """BIRD's protocol name for a peer: a symbol (letters, digits, '_') that stays unique per peer name."""
    readable = re.sub(r"[^A-Za-z0-9]", "_", peer)[:40]
    return f"peer_{readable}_{hashlib.blake2b(peer.encode(), digest_size=3).hexdigest()}"


@dataclass(frozen=True)
class _Group:
    prefixes: list[str]
    communities: list[tuple[int, int]]
    large_communities: list[tuple[int, int, int]]
    local_preference: int | None


def render(desired: bgp.Desired, node: str) -> str:
    """The whole bird.conf for `desired` (deterministic: the same input gives the same bytes)."""
    sessions = []
    for session in desired.sessions:
        peer = session.peer
        by_attributes: dict[bgp.Attributes, list[bgp.Network]] = {}
        for prefix, attributes in session.routes.items():
            by_attributes.setdefault(attributes, []).append(prefix)
        groups = [
            _Group(
                [str(p) for p in sorted(prefixes, key=_order)],
                sorted(attributes.communities),
                sorted(attributes.large_communities),
                attributes.local_preference,
            )
            for attributes, prefixes in by_attributes.items()
        ]
        groups.sort(key=lambda group: group.prefixes[0])
        sessions.append(
            {
                "peer": peer.name,
                "protocol": protocol(peer.name),
                "family": f"ipv{peer.address.version}",
                "address": str(peer.address),
                "port": peer.port,
                "source": str(peer.source) if peer.source else None,
                "local_asn": peer.local_asn,
                "peer_asn": peer.peer_asn,
                "hold": peer.hold,
                "keepalive": peer.keepalive_time,
                "multihop": peer.multihop and not peer.ibgp,
                "password": peer.password,
                "bfd": peer.bfd,
                "groups": groups,
            }
        )
    prefixes = sorted(desired.prefixes(), key=_order)
    return shared.template("bird.conf.j2").render(
        header=f"layerlb speaker on node {node}: BIRD 2 configuration",
        router_id=str(desired.router_id),
        prefixes4=[str(p) for p in prefixes if p.version == 4],
        prefixes6=[str(p) for p in prefixes if p.version == 6],
        bfd=any(session.peer.bfd for session in desired.sessions),
        sessions=sessions,
    )


def _order(prefix: bgp.Network) -> tuple[int, int, int]:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)


@dataclass(frozen=True)
class SessionState:
    """One BGP session as BIRD reports it: the shape of a BGPPeer's `status.nodes[]` entry, less the node."""

    state: str
    since: str | None = None
    last_error: str | None = None
    prefixes_advertised: int | None = None
    bfd: str | None = None

    def as_status(self, node: str) -> dict[str, object]:
        """The BGPPeer `status.nodes[]` entry (API field names)."""
        entry: dict[str, object] = {"node": node, "state": self.state}
        if self.since:
            entry["since"] = self.since
        if self.last_error:
            entry["lastError"] = self.last_error
        if self.prefixes_advertised is not None:
            entry["prefixesAdvertised"] = self.prefixes_advertised
        if self.bfd:
            entry["bfd"] = self.bfd
        return entry


_HEADER = re.compile(r"^(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+(?P<since>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?|\S+)(?:\s+(?P<info>.*))?$")  # fmt: skip
_FIELD = re.compile(r"^\s+(?P<key>[A-Za-z][A-Za-z ]*?):\s+(?P<value>.*)$")


def _since(text: str | None) -> str | None:
    """BIRD's `iso long` time (local, no zone) as RFC 3339; other formats are passed on as they are."""
    if text and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?", text):
        from datetime import datetime

        return datetime.fromisoformat(text).astimezone().isoformat(timespec="seconds")
    return text


def sessions(protocols: str, bfd_sessions: str = "") -> dict[str, SessionState]:
    """`birdc show protocols all` (and `show bfd sessions`) → BGP protocol name → its state."""
    bfd_by_address = bfd_states(bfd_sessions)
    found: dict[str, SessionState] = {}
    current: dict[str, str] | None = None
    blocks: list[dict[str, str]] = []
    for line in protocols.splitlines():
        header = _HEADER.match(line)
        if header and header["proto"] == "BGP":
            current = {"name": header["name"], "since": header["since"], "info": header["info"] or ""}
            blocks.append(current)
            continue
        if header and not line.startswith((" ", "\t")):
            current = None
            continue
        field = _FIELD.match(line)
        if current is not None and field:
            key = field["key"].strip()
            if key == "Routes" and "exported" in field["value"]:
                count = re.search(r"(\d+) exported", field["value"])
                current["exported"] = str(int(current.get("exported", "0")) + int(count[1] if count else 0))
            elif key not in current:
                current[key] = field["value"].strip()
    for block in blocks:
        state = block.get("BGP state", "")
        if state not in STATES:
            state = "Idle"  # Down, Close: no session
        exported = block.get("exported")
        error = block.get("Last error") or None
        if error is None and state in ("Connect", "Active"):
            error = NO_CONNECTION
        found[block["name"]] = SessionState(
            state=state,
            since=_since(block["since"]),
            last_error=error,
            prefixes_advertised=int(exported)
            if exported is not None
            else (0 if state == "Established" else None),
            bfd=bfd_by_address.get(_address(block.get("Neighbor address", ""))),
        )
    return found


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.split("%")[0].strip()))
    except ValueError:
        return text


def bfd_states(text: str) -> dict[str, str]:
    """`birdc show bfd sessions` → neighbour address → BFD state (Up, Down, Init, AdminDown)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].lower() in BFD_STATES:
            try:
                address = str(ipaddress.ip_address(parts[0]))
            except ValueError:
                continue
            found[address] = BFD_STATES[parts[2].lower()]
    return found


def by_peer(desired: bgp.Desired, states: Mapping[str, SessionState]) -> dict[str, SessionState]:
    """Peer name → its session's state, for the peers of `desired` (Idle until BIRD shows the protocol)."""
    return {
        session.peer.name: states.get(protocol(session.peer.name), SessionState("Idle"))
        for session in desired.sessions
    }

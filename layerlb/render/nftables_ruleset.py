"""The `nftables` format: a nat or dsr Plan as one `nft -f` table, and the nftables decisions behind it
(table name, weighted maps, hash seed, MAC rewriting) that the nftables kernel engine loads."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from layerlb import api, plan
from layerlb.render import shared

DEFAULT_DEVICE = "eth0"
PLACEHOLDER_MAC = "00:00:00:00:00:00"

NFTABLES_ARCHITECTURES = api.ENGINE_ARCHITECTURES[api.Engine.nftables]
NFTABLES_ALGORITHMS = (api.Algorithm.round_robin, api.Algorithm.source_hash)

# nft refuses longer names (NFT_NAME_MAXLEN is 256 with the terminating NUL).
NFT_NAME_MAX = 255
INTERFACE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# A table comment nft stores as is (the kernel keeps up to 256 bytes of user data).
NFT_COMMENT = re.compile(r"^[ -!#-~]{1,128}$")


def weight_ranges(weights: Sequence[int]) -> list[tuple[int, int] | None]:
    """Consecutive ranges of `0..sum(weights)-1`, one per weight, so that a uniform number picks by weight.

    A weight of 0 gets None (no range: the endpoint takes no new traffic). nftables maps a random, counted
    or hashed number modulo the sum through these ranges to an endpoint.
    """
    ranges: list[tuple[int, int] | None] = []
    start = 0
    for weight in weights:
        if weight <= 0:
            ranges.append(None)
            continue
        ranges.append((start, start + weight - 1))
        start += weight
    return ranges


def nft_range(first: int, last: int) -> str:
    """An nftables map key: `3`, or the interval `0-2`."""
    return str(first) if first == last else f"{first}-{last}"


def nft_table_name(p: plan.Plan) -> str:
    """`layerlb_<namespace>_<name>`: one table per LoadBalancer, so re-applying one never touches another.

    Kubernetes names hold no `_`, so the name is unique; dots and dashes are valid in nft names. A name
    beyond nft's limit keeps its start and gains a hash of the whole.
    """
    name = f"layerlb_{p.namespace}_{p.name}"
    if len(name) <= NFT_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[: NFT_NAME_MAX - 13]}_{digest}"


def nft_seed(p: plan.Plan) -> str:
    """A fixed jhash seed: every replica and every re-apply hash a client to the same endpoint."""
    return f"0x{zlib.crc32(p.key.encode()):08x}"


def _nftables_unsupported(p: plan.Plan) -> str | None:
    backend = shared.serving_backend(p)
    if backend.algorithm not in NFTABLES_ALGORITHMS:
        index = p.backends.index(backend)
        return (
            f"spec.backends[{index}].algorithm: format nftables renders round-robin and source-hash, "
            f"not {backend.algorithm}; use engine ipvs"
        )
    if p.session_affinity.type is not api.AffinityType.None_:
        return (
            f"spec.sessionAffinity.type: format nftables cannot keep {p.session_affinity.type} affinity; "
            "use algorithm source-hash or engine ipvs"
        )
    return None


@dataclass(frozen=True)
class NftRule:
    """What the template needs to write one rule under a comment saying which listener it serves."""

    comment: str
    rule: str


def nft_nat_rules(p: plan.Plan) -> list[NftRule]:
    """One DNAT rule per listener, spreading new connections over the endpoints by weight.

    round-robin counts (`numgen inc`), source-hash hashes the client address (`jhash`); conntrack
    carries the rest of each connection, so the map is consulted once per connection. A listener with no
    endpoint of weight above 0 gets no rule: its connections reach this node, where nothing listens.
    """
    backend = shared.serving_backend(p)
    ip = "ip6" if shared.is_ipv6(p.vip) else "ip"
    weights = [endpoint.weight for endpoint in backend.endpoints]
    total = sum(weight for weight in weights if weight > 0)
    if backend.algorithm is api.Algorithm.source_hash:
        selector = f"jhash {ip} saddr mod {total} seed {nft_seed(p)}"
    else:
        selector = f"numgen inc mod {total}"
    rules = []
    for listener in p.listeners:
        comment = (
            f"listener {listener.name} ({listener.transport} {listener.port}) -> backend {backend.name} "
            f"({backend.algorithm})"
        )
        match = f"{ip} daddr {p.vip} {listener.transport.lower()} dport {listener.port}"
        entries = [
            f"{nft_range(*span)} : {e.address} . {e.port or listener.port}"
            for e, span in zip(backend.endpoints, weight_ranges(weights), strict=True)
            if span is not None
        ]
        if not entries:
            rules.append(NftRule(f"{comment}: no endpoint of weight above 0", ""))
            continue
        rules.append(NftRule(comment, f"{match} dnat to {selector} map {{ {', '.join(entries)} }}"))
    return rules


def nft_guard_rules(p: plan.Plan) -> list[str]:
    """What the node itself accepts on the VIP: its listeners' ports and ICMP; anything else is rejected.

    The VIP is an address of the node (on `lo`), so without these rules a client of the VIP reaches every
    socket bound to the node's wildcard address - sshd, the kubelet, host-network admin ports (issue #18;
    kube-proxy's IPVS mode had the same hole, kubernetes/kubernetes#72236). Reject, not drop: the client
    sees what a closed port answers (TCP reset, ICMP port unreachable), as with kube-proxy's
    KUBE-IPVS-FILTER, so nothing tells a listening node port from a closed one and a client that
    mistyped a port fails at once instead of after its connect timeout. ICMP stays allowed: a ping of
    the VIP discloses only that it is up (its listeners already do), and path-MTU discovery needs ICMP.
    """
    ip = "ip6" if shared.is_ipv6(p.vip) else "ip"
    icmp = "ipv6-icmp" if ip == "ip6" else "icmp"
    ports: dict[str, list[int]] = {}
    for listener in p.listeners:
        known = ports.setdefault(listener.transport.lower(), [])
        if listener.port not in known:
            known.append(listener.port)
    rules = [
        f"{ip} daddr {p.vip} {transport} dport {{ {', '.join(str(port) for port in sorted(numbers))} }} accept"
        for transport, numbers in sorted(ports.items())
    ]
    rules += [
        f"{ip} daddr {p.vip} meta l4proto {icmp} accept",
        f"{ip} daddr {p.vip} meta l4proto tcp reject with tcp reset",
        f"{ip} daddr {p.vip} reject",
    ]
    return rules


def nft_guard_table_name(p: plan.Plan) -> str:
    """`layerlb_guard_<namespace>_<name>`: the guard table of an engine that has no table of its own."""
    name = f"layerlb_guard_{p.namespace}_{p.name}"
    if len(name) <= NFT_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[: NFT_NAME_MAX - 13]}_{digest}"


def nft_guard_ruleset(p: plan.Plan, comment: str | None = None) -> str:
    """The guard alone, as one `nft -f` transaction replacing its own table: for the IPVS engine and
    `transparent`, which put the VIP on the node but program no nftables table of their own.

    Its input chain runs at the filter priority (0), before IPVS takes packets at LOCAL_IN (priority 98
    and 99, NF_IP_PRI_NAT_SRC - 2 and - 1), so IPVS still sees the listeners' ports it balances.
    """
    if comment is not None and not NFT_COMMENT.match(comment):
        raise ValueError(f"table comment {comment!r} must be 1-128 printable characters without quotes")
    family = "ip6" if shared.is_ipv6(p.vip) else "ip"
    table = nft_guard_table_name(p)
    lines = [
        f"# {shared.header(p)}: only the VIP's listeners' ports (and ICMP) reach this node's sockets",
        f"table {family} {table} {{}}",
        f"delete table {family} {table}",
        f"table {family} {table} {{",
        *([f'\tcomment "{comment}"'] if comment else []),
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        *(f"\t\t{rule}" for rule in nft_guard_rules(p)),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nft_masquerade_rule(p: plan.Plan) -> str:
    """Masquerade connections this table balanced: backends then reply to this node, not the client."""
    ip = "ip6" if shared.is_ipv6(p.vip) else "ip"
    return f"ct status dnat ct original {ip} daddr {p.vip} masquerade"


def nft_dsr_rules(
    p: plan.Plan, device: str, device_mac: str, neighbours: Mapping[str, str]
) -> tuple[list[NftRule], bool]:
    """One MAC-rewriting rule per listener, and whether a placeholder MAC stands in for unknown ones.

    The hash is per flow (source address and port; source-hash: the address alone), never per packet,
    or a TCP connection would be split across backends. The source MAC becomes this node's, or the
    bridge would learn the client's MAC on this port and the backends' replies would go astray.

    Every node renders the same hash for the same endpoint set, so a flow a router moves to another
    node (ECMP) reaches the same backend there: the key is the flow (the rule's match fixes protocol,
    VIP and port, so client address and port complete the 5-tuple), the seed is the LoadBalancer's
    (`nft_seed`), and the map follows the Plan's endpoint order, sorted by address in `resolve`.
    Round-robin under dsr is therefore this flow hash. Only the node's own MAC and device differ.
    """
    backend = shared.serving_backend(p)
    ip = "ip6" if shared.is_ipv6(p.vip) else "ip"
    weights = [endpoint.weight for endpoint in backend.endpoints]
    total = sum(weight for weight in weights if weight > 0)
    placeholder = device_mac == PLACEHOLDER_MAC
    rules = []
    for listener in p.listeners:
        transport = listener.transport.lower()
        key = (
            f"{ip} saddr"
            if backend.algorithm in api.HASHING_ALGORITHMS  # their key is the client address (the API's)
            else f"{ip} saddr . {transport} sport"
        )
        comment = (
            f"listener {listener.name} ({listener.transport} {listener.port}) -> backend {backend.name} "
            f"({backend.algorithm})"
        )
        entries = []
        for endpoint, span in zip(backend.endpoints, weight_ranges(weights), strict=True):
            if span is None:
                continue
            mac = neighbours.get(endpoint.address, PLACEHOLDER_MAC)
            placeholder = placeholder or mac == PLACEHOLDER_MAC
            entries.append(f"{nft_range(*span)} : {mac}")
        if not entries:
            rules.append(NftRule(f"{comment}: no endpoint of weight above 0", ""))
            continue
        rule = (
            f"{ip} daddr {p.vip} {transport} dport {listener.port} ether saddr set {device_mac} "
            f"ether daddr set jhash {key} mod {total} seed {nft_seed(p)} map {{ {', '.join(entries)} }} "
            f'fwd to "{device}"'
        )
        rules.append(NftRule(comment, rule))
    return rules, placeholder


def _mac(value: str, what: str) -> str:
    mac = value.strip().lower()
    if not MAC.match(mac):
        raise ValueError(f"{what} {value!r} is not a MAC address such as 02:00:00:00:00:01")
    return mac


def _neighbours(neighbours: Mapping[str, str] | None) -> dict[str, str]:
    return {
        str(ipaddress.ip_address(address)): _mac(mac, f"the MAC of {address}")
        for address, mac in (neighbours or {}).items()
    }


def nftables(
    p: plan.Plan,
    *,
    device: str = DEFAULT_DEVICE,
    device_mac: str | None = None,
    neighbours: Mapping[str, str] | None = None,
    masquerade: bool = False,
    comment: str | None = None,
    guard: bool = True,
) -> str:
    """The `nft -f` ruleset of a nat or dsr Plan: one table, replaced in one transaction.

    `guard`: reject what is sent to the VIP but not to a listener (`nft_guard_rules`); off for a VIP that
    is also the node's own address, whose other ports are the node's to serve.
    """
    table = nft_table_name(p)
    if comment is not None and not NFT_COMMENT.match(comment):
        raise ValueError(f"table comment {comment!r} must be 1-128 printable characters without quotes")
    if p.architecture is api.Architecture.nat:
        return shared.template("nftables.j2").render(
            header=shared.header(p),
            family="ip6" if shared.is_ipv6(p.vip) else "ip",
            table=table,
            nat=True,
            rules=nft_nat_rules(p),
            masquerade=masquerade,
            masquerade_rule=nft_masquerade_rule(p),
            guard=nft_guard_rules(p) if guard else [],
            comment=comment,
        )
    if not INTERFACE_NAME.match(device):
        raise ValueError(f"device {device!r} is not an interface name")
    rules, placeholder = nft_dsr_rules(
        p, device, _mac(device_mac, "device_mac") if device_mac else PLACEHOLDER_MAC, _neighbours(neighbours)
    )
    return shared.template("nftables.j2").render(
        header=shared.header(p),
        family="netdev",
        table=table,
        nat=False,
        device=device,
        rules=rules,
        placeholder=placeholder,
        guard=nft_guard_rules(p) if guard else [],
        comment=comment,
    )


def unsupported(p: plan.Plan) -> str | None:
    """Why the nftables format cannot render `p` (a message naming the field), or None when it can."""
    kernel = shared.kernel_unsupported(p, "nftables", api.Engine.nftables, NFTABLES_ARCHITECTURES)
    return kernel or _nftables_unsupported(p)

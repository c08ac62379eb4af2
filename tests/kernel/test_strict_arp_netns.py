"""Strict ARP with real ARP and NDP: a node with a VIP on its loopback must not answer for it on the LAN
once `strict_arp.check` ran — through /proc/sys where it is writable, through rtnetlink where a container
runtime mounted it read-only — and says so when it can do neither.

    client 10.0.61.2 (fd00:61::2) ── eth0 | node 10.0.61.1 (fd00:61::1), VIP 10.0.61.100 and fd00:61::100 on lo

The client resolves with arping / ndisc6 (their stdout: which MACs answered); the node's check runs in
a child process in its namespace, optionally inside a mount namespace with /proc/sys bind-mounted
read-only (what containerd gives a non-privileged container) and without CAP_NET_ADMIN.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterator

import pytest
from layerlb_dataplane.kernel import strict_arp

from tests.netns import Namespace, Topology

NODE, CLIENT, VIP = "10.0.61.1", "10.0.61.2", "10.0.61.100"
NODE6, CLIENT6, VIP6 = "fd00:61::1", "fd00:61::2", "fd00:61::100"
KNOBS = ("arp_ignore", "arp_announce")


@pytest.fixture
def lan() -> Iterator[tuple[Namespace, Namespace]]:
    with Topology("strictarp") as topo:
        node, client = topo.namespace("node"), topo.namespace("client")
        topo.link(node, "eth0", client, "eth0")
        for namespace in (node, client):
            namespace.sysctl("net.ipv6.conf.all.accept_dad", 0)
            namespace.sysctl("net.ipv6.conf.eth0.accept_dad", 0)
        node.addr("eth0", f"{NODE}/24")
        node.addr("eth0", f"{NODE6}/64")
        client.addr("eth0", f"{CLIENT}/24")
        client.addr("eth0", f"{CLIENT6}/64")
        node.ip("link", "set", "lo", "up")
        node.ip("addr", "add", f"{VIP}/32", "dev", "lo")
        node.ip("-6", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad")
        yield node, client


def arping(client: Namespace, address: str) -> set[str]:
    done = client.run(["arping", "-c", "2", "-w", "2", "-i", "eth0", address], check=False, timeout=20)
    return set(re.findall(r"from ([0-9a-f:]{17})", done.stdout.lower()))


def ndisc(client: Namespace, address: str) -> set[str]:
    done = client.run(
        ["ndisc6", "-m", "-n", "-r", "2", "-w", "500", address, "eth0"], check=False, timeout=20
    )
    return {mac.lower() for mac in re.findall(r"link-layer address:\s*([0-9A-Fa-f:]{17})", done.stdout)}


def node_mac(node: Namespace) -> str:
    return str(json.loads(node.ip("-j", "link", "show", "eth0"))[0]["address"]).lower()


def knobs(node: Namespace, interface: str) -> tuple[int, ...]:
    return tuple(int(node.run(["sysctl", "-n", f"net.ipv4.conf.{interface}.{k}"]).stdout) for k in KNOBS)


def check_in(node: Namespace, *, read_only: bool = False, net_admin: bool = True) -> dict[str, object]:
    """`strict_arp.check()` in the node's namespace, as a forwarding pod's process would run it there."""
    code = (
        "import json; from layerlb_dataplane.kernel import strict_arp; "
        "o = strict_arp.check(); print(json.dumps({'changes': o.changes, 'warning': o.warning}))"
    )
    command = shlex.join([sys.executable, "-c", code])
    if not net_admin:
        command = f"setpriv --bounding-set -net_admin --inh-caps -net_admin {command}"
    if read_only:
        command = f"mount --bind -o ro /proc/sys /proc/sys && {command}"
    done = node.run(["unshare", "--mount", "sh", "-c", command])
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_node_answers_arp_for_a_loopback_vip_until_strict_arp_is_enforced(
    lan: tuple[Namespace, Namespace],
) -> None:
    node, client = lan
    mac = node_mac(node)
    assert arping(client, VIP) == {mac}  # Linux's default: the problem this module exists for
    assert check_in(node) == {"changes": 2, "warning": None}
    assert knobs(node, "all") == (1, 2)
    assert arping(client, VIP) == set()
    assert arping(client, NODE) == {mac}  # the node's own address is still answered
    assert check_in(node) == {"changes": 0, "warning": None}  # idempotent


def test_with_proc_sys_read_only_each_interface_is_made_strict_through_rtnetlink(
    lan: tuple[Namespace, Namespace],
) -> None:
    node, client = lan
    assert check_in(node, read_only=True) == {"changes": 1, "warning": None}
    assert knobs(node, "all") == (0, 0)  # untouched: it could not be written
    assert knobs(node, "eth0") == (1, 2)
    assert arping(client, VIP) == set()
    assert arping(client, NODE) == {node_mac(node)}


def test_without_any_way_to_write_it_the_check_warns_and_the_node_still_answers(
    lan: tuple[Namespace, Namespace],
) -> None:
    node, client = lan
    outcome = check_in(node, read_only=True, net_admin=False)
    assert outcome["changes"] == 0
    warning = str(outcome["warning"])
    assert "eth0" in warning and "net.ipv4.conf.all.arp_ignore=1" in warning, warning
    assert "Read-only file system" in warning, warning
    assert arping(client, VIP) == {node_mac(node)}


def test_a_node_already_strict_is_left_as_it_is(lan: tuple[Namespace, Namespace]) -> None:
    node, _ = lan
    node.sysctl("net.ipv4.conf.all.arp_ignore", 2)  # stricter than 1: never lowered
    node.sysctl("net.ipv4.conf.all.arp_announce", 2)
    assert check_in(node, read_only=True, net_admin=False) == {"changes": 0, "warning": None}
    assert knobs(node, "all") == (2, 2)


def test_ndp_is_never_answered_for_an_address_on_the_loopback(lan: tuple[Namespace, Namespace]) -> None:
    """Why strict ARP has no IPv6 half: with every default, a VIP on lo gets no Neighbor Advertisement."""
    node, client = lan
    assert knobs(node, "all") == (0, 0)
    assert ndisc(client, NODE6) == {node_mac(node)}  # NDP works on this link
    assert ndisc(client, VIP6) == set()


def test_the_environment_switch() -> None:
    assert strict_arp.enabled({strict_arp.ENV: "1"})
    assert not strict_arp.enabled({})
    assert not strict_arp.enabled({strict_arp.ENV: "0"})

"""Node addresses for the kernel engines: whether a VIP is already local, read with `ip -j`.

Both engines place the VIP on the node (nat on `lo`, dsr/tunnel on the interface, or on `lo` too with
strict ARP: `strict_arp`) and must not add or later remove an address the node already had; this is the
one place that decides it.
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
from collections.abc import Mapping

from layerlb.render import shared


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; the caller reads the return code."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def ip_json(*args: str) -> list[dict[str, object]]:
    """`ip -j ARGS` decoded; empty when `ip` fails (e.g. no route), which callers treat as "none"."""
    done = ip("-j", *args)
    if done.returncode != 0:
        return []
    loaded = json.loads(done.stdout or "[]")
    return [entry for entry in loaded if isinstance(entry, dict)] if isinstance(loaded, list) else []


def infos(link: Mapping[str, object]) -> list[Mapping[str, object]]:
    """The `addr_info` entries of one link of `ip -j addr`."""
    found = link.get("addr_info")
    return [info for info in found if isinstance(info, Mapping)] if isinstance(found, list) else []


def is_local(vip: str) -> bool:
    """Whether `vip` is an address of this node: binding to it succeeds (unless non-local binds are allowed)."""
    v6 = shared.is_ipv6(vip)
    try:
        with open(f"/proc/sys/net/{'ipv6' if v6 else 'ipv4'}/ip_nonlocal_bind") as file:
            nonlocal_bind = file.read().strip() != "0"
    except OSError:
        nonlocal_bind = False
    if nonlocal_bind:
        host = f"{vip}/{128 if v6 else 32}"
        return any(info.get("local") for link in ip_json("addr", "show", "to", host) for info in infos(link))
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((vip, 0))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


# The label layerlb's own loopback VIPs carry (IPv4), so that removal takes only an address layerlb added.
LOOPBACK_LABEL = "lo:llb"


def is_foreign(vip: str) -> bool:
    """Whether `vip` is an address the node had of its own (not one layerlb placed: an IPv4 address
    labelled `*:llb`, an IPv6 /128). The VIP guard leaves such an address alone: it is also the node's
    address for sshd, the kubelet and the replies to its own connections."""
    host = f"{vip}/{128 if shared.is_ipv6(vip) else 32}"
    for link in ip_json("addr", "show", "to", host):
        for info in infos(link):
            if not info.get("local"):
                continue
            ours = (
                info.get("prefixlen") == 128
                if shared.is_ipv6(vip)
                else str(info.get("label", "")).endswith(":llb")
            )
            if not ours:
                return True
    return False


def add_to_loopback(vip: str) -> bool:
    """Put `vip` on this node's loopback (so packets for it are delivered here), unless it is local already;
    True when it was added. Raises OSError with `ip`'s message when the kernel refuses."""
    if is_local(vip):
        return False
    if shared.is_ipv6(vip):
        done = ip("-6", "addr", "add", f"{vip}/128", "dev", "lo", "nodad")
    else:
        done = ip("addr", "add", f"{vip}/32", "dev", "lo", "label", LOOPBACK_LABEL)
    if done.returncode != 0 and "File exists" not in done.stderr:
        raise OSError(f"adding the VIP {vip} to lo: {done.stderr.strip()}")
    ip("link", "set", "lo", "up")
    return True


def remove_from_loopback(vip: str) -> None:
    """Take `vip` off the loopback again (an IPv4 address only when it carries layerlb's label)."""
    if shared.is_ipv6(vip):
        ip("-6", "addr", "del", f"{vip}/128", "dev", "lo")
    else:
        ip("addr", "del", f"{vip}/32", "dev", "lo", "label", LOOPBACK_LABEL)

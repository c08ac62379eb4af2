"""The VIP guard of the IPVS engine and `transparent` with real packets in network namespaces (issue #18):
a VIP on the node reaches its listeners' ports, and NOT the node's own services bound to the wildcard
address, which stay reachable on the node's own address.

    client 10.0.7.2 ── eth0 ── node 10.0.7.1 (eth0), VIP 10.0.70.1 on lo (client's route to it via the node)

On the node: a service on 0.0.0.0:2222 (as sshd or the kubelet listen), and the listener the Plan names on
0.0.0.0:80 (IPVS takes that port at LOCAL_IN, after the guard; this machine's kernel has no IPVS, so a
socket stands in for it). The transparent test runs `layerlb serve`'s runtime itself, whose listener binds
the VIP. The nftables engine's guard (the same rules in its own table) is tested in
`test_nftables_netns.py`; with IPVS behind it, only in the QEMU guest (not written yet, see
docs/security.md).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from layerlb_dataplane.kernel import addresses, vip_guard

from layerlb import api, plan
from layerlb.render import nftables_ruleset
from tests.netns import Namespace, Topology

NODE, CLIENT, VIP = "10.0.7.1", "10.0.7.2", "10.0.70.1"
LISTENER_PORT, NODE_SERVICE_PORT = 80, 2222
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "l7-transparent.yaml"


# ---- functions that run inside the namespaces (module level, so tests.netns can import them there) ----


def says(port: int, word: str) -> None:
    """A TCP service on the wildcard address that says `word` to every connection."""
    server = socket.create_server(("0.0.0.0", port), backlog=64)
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        with connection:
            connection.sendall(word.encode() + b"\n")


def outcome(address: str, port: int) -> str:
    """What a TCP client gets from `address:port`: the first line served ("connected" if none within 2 s),
    "refused", or "timeout"."""
    try:
        with socket.create_connection((address, port), timeout=15) as connection:
            connection.settimeout(2)
            try:
                return connection.makefile().readline().strip() or "closed"
            except TimeoutError:
                return "connected"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


def guard_steps(plan_json: str, vip: str) -> dict[str, object]:
    """In the node namespace: the guard loaded as the IPVS engine loads it (before the VIP goes on lo), then
    again (a no-op), with a second listener, and what the kernel holds."""
    p = plan.Plan.model_validate_json(plan_json)
    guard = vip_guard.VipGuard()
    facts: dict[str, object] = {"first": guard.ensure(p).changes}
    addresses.add_to_loopback(vip)
    facts["again"] = guard.ensure(p).changes
    facts["restarted"] = vip_guard.VipGuard().ensure(p).changes  # a new process adopts the table
    table = nftables_ruleset.nft_guard_table_name(p)
    facts["listing"] = subprocess.run(
        ["nft", "list", "table", "ip", table], capture_output=True, text=True
    ).stdout
    return facts


def ensure_guard(plan_json: str) -> int:
    return vip_guard.VipGuard().ensure(plan.Plan.model_validate_json(plan_json)).changes


def remove_guard(plan_json: str) -> None:
    vip_guard.VipGuard().remove(plan.Plan.model_validate_json(plan_json))


def serve_transparent(example: str, vip: str, port: int) -> None:
    """`layerlb serve`'s runtime with the transparent example on `vip`:`port` until SIGTERM."""
    import json

    from layerlb_dataplane.control import config, runtime

    os.environ[runtime.FREEBIND_ENV] = "1"
    rendered = subprocess.run(
        [sys.executable, "-m", "layerlb.cli", "render", "--format", "dataplane", example],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    p = plan.Plan.model_validate(json.loads(rendered.stdout))
    listener = p.listeners[0].model_copy(update={"port": port})
    p = p.model_copy(update={"vip": vip, "listeners": (listener,)})

    async def main() -> None:
        dataplane = runtime.Dataplane(config.StaticSource([p]), signals=(), probe_health=False)
        problem = await dataplane.apply([p], initial=True)
        print(f"ready {problem or ''} {dataplane.warnings()}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ---- the test's side ----------------------------------------------------------------------------------


def make_plan(
    ports: tuple[int, ...], vip: str = VIP, architecture: api.Architecture = api.Architecture.nat
) -> plan.Plan:
    return plan.Plan(
        name="web",
        namespace="shop",
        generation=1,
        mode=api.Mode.L4,
        architecture=architecture,
        engine=api.Engine.ipvs,
        vip=vip,
        listeners=tuple(
            plan.Listener(name=f"p{port}", port=port, protocol=api.Protocol.TCP, transport="TCP")
            for port in ports
        ),
        backends=(
            plan.Backend(
                name="app",
                algorithm=api.Algorithm.round_robin,
                endpoints=(plan.Endpoint(address="10.0.9.9", port=8080, weight=1),),
            ),
        ),
        default_backend="app",
    )


@pytest.fixture
def lab() -> Iterator[dict[str, Namespace]]:
    """client ── node, the node serving on 0.0.0.0:80 (the listener) and 0.0.0.0:2222 (its own service)."""
    with Topology("vipguard", timeout=60) as topo:
        client, node = topo.namespace("client"), topo.namespace("node")
        topo.link(client, "eth0", node, "eth0")
        client.addr("eth0", f"{CLIENT}/24")
        node.addr("eth0", f"{NODE}/24")
        client.route(f"{VIP}/32 via {NODE}")
        node.run(["ip", "link", "set", "lo", "up"])
        yield {"client": client, "node": node}


def start(node: Namespace, port: int, word: str) -> None:
    node.spawn(says, port, word).wait_for_line("ready", timeout=30)


def test_the_guard_lets_the_listeners_through_and_rejects_the_nodes_own_ports(
    lab: dict[str, Namespace],
) -> None:
    client, node = lab["client"], lab["node"]
    start(node, LISTENER_PORT, "listener")
    start(node, NODE_SERVICE_PORT, "node")
    p = make_plan((LISTENER_PORT,))
    facts = node.call(guard_steps, p.model_dump_json(), VIP)
    assert facts["first"] == 1 and facts["again"] == 0 and facts["restarted"] == 0, facts
    assert "hook input priority filter" in str(facts["listing"])
    assert client.call(outcome, VIP, LISTENER_PORT) == "listener"
    assert client.call(outcome, VIP, NODE_SERVICE_PORT) == "refused"  # a TCP reset
    assert client.call(outcome, NODE, NODE_SERVICE_PORT) == "node"  # the node's own address: untouched
    client.run(["ping", "-c", "1", "-W", "10", VIP])  # ICMP passes

    both = make_plan((LISTENER_PORT, NODE_SERVICE_PORT))  # a listener on that port: it is the VIP's now
    assert node.call(ensure_guard, both.model_dump_json()) == 1
    assert client.call(outcome, VIP, NODE_SERVICE_PORT) == "node"
    assert node.call(ensure_guard, p.model_dump_json()) == 1
    assert client.call(outcome, VIP, NODE_SERVICE_PORT) == "refused"

    node.call(remove_guard, p.model_dump_json())
    assert node.run(["nft", "list", "tables"]).stdout.strip() == ""
    assert client.call(outcome, VIP, NODE_SERVICE_PORT) == "node"  # what #18 found, without the guard


def test_a_vip_that_is_the_nodes_own_address_is_not_guarded(lab: dict[str, Namespace]) -> None:
    client, node = lab["client"], lab["node"]
    start(node, NODE_SERVICE_PORT, "node")
    assert node.call(ensure_guard, make_plan((LISTENER_PORT,), vip=NODE).model_dump_json()) == 0
    assert node.run(["nft", "list", "tables"]).stdout.strip() == ""
    assert client.call(outcome, NODE, NODE_SERVICE_PORT) == "node"  # sshd on the node's address stays


def test_a_transparent_vip_serves_its_listener_and_not_the_nodes_own_ports(lab: dict[str, Namespace]) -> None:
    client, node = lab["client"], lab["node"]
    start(node, NODE_SERVICE_PORT, "node")
    served = node.spawn(serve_transparent, str(EXAMPLE), VIP, LISTENER_PORT)
    try:
        line = served.wait_for_line("ready", timeout=60)
        assert line == "ready  []", line  # applied, no warning (the guard loaded)
        assert (
            client.call(outcome, VIP, LISTENER_PORT) == "connected"
        )  # the HTTP listener waits for a request
        assert client.call(outcome, VIP, NODE_SERVICE_PORT) == "refused"
        assert client.call(outcome, NODE, NODE_SERVICE_PORT) == "node"
    finally:
        served.stop()

"""The nftables engine with real packets in network namespaces: a nat or dsr Plan must carry TCP connections
from a client to backends, with weights, health, drain, idempotent re-syncs and restarts, and no other table
touched.

nat (the LB routes between two links; backends' default route is via the LB):

    client 10.0.1.2 ── eth0 ┐               ┌ b1 ── be1 10.0.2.11 ┐
                          lb 10.0.1.1 ... br0 10.0.2.1 ── b2 ── be2 10.0.2.12 ├ HTTP :8080
                          VIP 10.0.100.1 on lo └ b3 ── be3 10.0.2.13 ┘

dsr (one L2 segment, a bridge in a `sw` namespace; backends own the VIP on lo, arp_ignore=1,
arp_announce=2, and reply to the client directly):

    client 10.0.3.2, lb 10.0.3.1 (VIP 10.0.3.100 on lo), be1 10.0.3.11, be2 10.0.3.12 ── sw/br0

The engine runs in the LB namespace inside a small agent process (`engine_agent`), so that one engine
instance lives across syncs (as in `layerlb serve`) and a restart is a new agent. Each backend answers
HTTP/1.1 (keep-alive) with its name and the peer address it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pytest
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.kernel import addresses, nftables

from layerlb import api, plan
from layerlb.render import nftables_ruleset
from tests.netns import Namespace, Spawned, Topology

VIP_NAT = "10.0.100.1"
VIP_DSR = "10.0.3.100"
CLIENT_NAT, CLIENT_DSR = "10.0.1.2", "10.0.3.2"
LB_BACK = "10.0.2.1"
NAT_BACKENDS = {"be1": "10.0.2.11", "be2": "10.0.2.12", "be3": "10.0.2.13"}
DSR_BACKENDS = {"be1": "10.0.3.11", "be2": "10.0.3.12"}
NAT_PORT, DSR_PORT, BACKEND_PORT = 80, 80, 8080
NODE_SERVICE_PORT = 2222  # a node service bound to the wildcard address (sshd, say), not a listener
FOREIGN = """table inet foreign {
	set allowed {
		type ipv4_addr
		elements = { 192.0.2.7 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @allowed accept
	}
}
"""
# Counts, on the LB's own interface and ahead of layerlb's chain, what the DSR test must tell apart:
# client packets to the VIP (the LB must see them) and backend replies from the VIP (it must not).
DSR_PROBE = f"""table netdev probe {{
	chain ingress {{
		type filter hook ingress device "eth0" priority -10; policy accept;
		ip daddr {VIP_DSR} tcp dport {DSR_PORT} counter
		ip saddr {VIP_DSR} tcp sport {DSR_PORT} counter
	}}
}}
"""


# ---- functions that run inside the namespaces (module level, so tests.netns can import them there) ----


def http_backend(name: str, port: int) -> None:
    """An HTTP/1.1 server (keep-alive) whose every response says who answered and which peer it saw."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                body = json.dumps({"backend": name, "peer": peer}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=512)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def _get(connection: http.client.HTTPConnection) -> dict[str, str]:
    connection.request("GET", "/")
    answer: dict[str, str] = json.loads(connection.getresponse().read())
    return answer


def fetch_many(address: str, port: int, count: int, per_connection: int = 1) -> list[list[dict[str, str]]]:
    """`count` new connections, `per_connection` requests on each; the answers, connection by connection."""
    answers = []
    for _ in range(count):
        connection = http.client.HTTPConnection(address, port, timeout=10)
        try:
            answers.append([_get(connection) for _ in range(per_connection)])
        finally:
            connection.close()
    return answers


def hold_connection(address: str, port: int, backend: str) -> None:
    """Opens connections until one lands on `backend` and holds it; on each SIGUSR1 it sends one more
    request on that same connection and prints the answer (or the error)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    for _ in range(200):
        connection = http.client.HTTPConnection(address, port, timeout=5)
        if _get(connection)["backend"] == backend:
            break
        connection.close()
    else:
        raise RuntimeError(f"no connection landed on {backend}")
    print(f"held {backend}", flush=True)
    while True:
        signal.sigwait({signal.SIGUSR1})
        try:
            print("again " + json.dumps(_get(connection)), flush=True)
        except (OSError, http.client.HTTPException) as error:
            print(f"again error {type(error).__name__}", flush=True)


def engine_agent(path: str, options: dict[str, Any]) -> None:
    """One NftablesEngine serving JSON-line commands on a unix socket: sync, remove, desired."""
    engine = nftables.NftablesEngine(**options)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        with connection, connection.makefile("rw") as stream:
            for line in stream:
                command = json.loads(line)
                try:
                    reply = _agent_command(engine, command)
                except Exception as error:
                    reply = {"error": f"{type(error).__name__}: {error}"}
                stream.write(json.dumps(reply) + "\n")
                stream.flush()


def _agent_command(engine: nftables.NftablesEngine, command: dict[str, Any]) -> dict[str, Any]:
    p = plan.Plan.model_validate_json(command["plan"])
    if command["op"] == "remove":
        engine.remove(p)
        return {}
    if "drain_seconds" in command:
        engine.drain_seconds = command["drain_seconds"]
    targets: dict[str, list[Target]] = {}
    for spec in command.get("targets", []):
        target = Target(spec["backend"], spec["address"], spec["port"], spec["weight"])
        target.health.healthy = spec.get("healthy", True)
        target.draining = spec.get("draining", False)
        target.active = spec.get("active", 0)
        targets.setdefault(target.backend, []).append(target)
    if command["op"] == "desired":
        desired = engine.desired(p, targets)
        return {"ruleset": desired.ruleset, "neighbours": desired.neighbours, "device": desired.device}
    report = engine.sync(p, targets)
    return {"changes": report.changes, "seconds": report.seconds}


def bench_sync(plans_json: list[str], servers: int) -> dict[str, float]:
    """Times a first sync and a no-op re-sync of every Plan with one engine (the bench figures)."""
    plans = [plan.Plan.model_validate_json(text) for text in plans_json]
    engine = nftables.NftablesEngine()
    started = time.perf_counter()
    first = [engine.sync(p, {}) for p in plans]
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    again = [engine.sync(p, {}) for p in plans]
    again_seconds = time.perf_counter() - started
    started = time.perf_counter()
    renders = [engine.desired(p, {}) for p in plans]
    render_seconds = time.perf_counter() - started
    rules = sum(text.count(" dnat to ") for text in (d.ruleset for d in renders))
    for p in plans:
        engine.remove(p)
    return {
        "plans": len(plans),
        "services": rules,
        "servers": servers,
        "first_changes": sum(r.changes for r in first),
        "first_seconds": first_seconds,
        "noop_changes": sum(r.changes for r in again),
        "noop_seconds": again_seconds,
        "render_seconds": render_seconds,
    }


def engines_agree_and_switch_families() -> dict[str, Any]:
    """In a bare namespace: the nft-command fallback and libnftables load the same table and adopt each
    other's; an IPv6 VIP goes on lo and away; a nat Plan turned dsr leaves no ip table behind."""
    facts: dict[str, Any] = {}
    v6 = make_plan(api.Architecture.nat, "fd00:100::1", [("fd00:2::11", 8080, 1)])
    command = nftables.NftablesEngine(nft=nftables.NftCommand())
    library = nftables.NftablesEngine(nft=nftables.LibNft())
    facts["command_first"] = command.sync(v6, {}).changes
    facts["library_adopts"] = library.sync(v6, {}).changes
    facts["command_again"] = command.sync(v6, {}).changes
    facts["vip_local"] = addresses.is_local("fd00:100::1")
    library.remove(v6)
    facts["vip_after_remove"] = addresses.is_local("fd00:100::1")
    facts["table_after_remove"] = command._families_holding("layerlb_shop_web")

    subprocess.run(["ip", "link", "add", "lbside", "type", "veth", "peer", "name", "far"], check=True)
    subprocess.run(["ip", "addr", "add", "10.0.9.1/24", "dev", "lbside"], check=True)
    for device in ("lbside", "far"):
        subprocess.run(["ip", "link", "set", device, "up"], check=True)
    engine = nftables.NftablesEngine(neighbour_timeout=0.3)
    engine.sync(make_plan(api.Architecture.nat, "10.0.100.1", [("10.0.9.2", 8080, 1)]), {})
    facts["before_switch"] = engine._families_holding("layerlb_shop_web")
    dsr = make_plan(api.Architecture.dsr, "10.0.100.1", [("10.0.9.2", None, 1)])
    fresh = nftables.NftablesEngine(neighbour_timeout=0.3)  # knows nothing of the ip table
    facts["switch_changes"] = fresh.sync(dsr, {}).changes
    facts["after_switch"] = fresh._families_holding("layerlb_shop_web")
    facts["unresolved"] = sorted(fresh.unresolved["layerlb_shop_web"])
    facts["dsr_rules"] = fresh.desired(dsr, {}).ruleset.count("fwd to")
    return facts


# ---- the test's side ----------------------------------------------------------------------------------


def make_plan(
    architecture: api.Architecture,
    vip: str,
    endpoints: list[tuple[str, int | None, int]],
    *,
    name: str = "web",
    namespace: str = "shop",
    ports: tuple[int, ...] = (80,),
) -> plan.Plan:
    """An L4 Plan for the nftables engine: one TCP listener per port, one round-robin backend `app`."""
    return plan.Plan(
        name=name,
        namespace=namespace,
        generation=1,
        mode=api.Mode.L4,
        architecture=architecture,
        engine=api.Engine.nftables,
        vip=vip,
        listeners=tuple(
            plan.Listener(name=f"p{port}", port=port, protocol=api.Protocol.TCP, transport="TCP")
            for port in ports
        ),
        backends=(
            plan.Backend(
                name="app",
                algorithm=api.Algorithm.round_robin,
                endpoints=tuple(plan.Endpoint(address=a, port=p, weight=w) for a, p, w in endpoints),
            ),
        ),
        default_backend="app",
    )


def target(address: str, port: int | None, weight: int = 1, **state: Any) -> dict[str, Any]:
    """A target as the agent receives it: backend `app`, healthy and not draining unless said."""
    return {"backend": "app", "address": address, "port": port, "weight": weight, **state}


class Agent:
    """The test's handle on an engine agent in the LB namespace."""

    def __init__(self, lb: Namespace, **options: Any) -> None:
        self.lb = lb
        self.path = os.path.join(tempfile.mkdtemp(prefix="llbt-nft-"), "agent.sock")
        self.process: Spawned = lb.spawn(engine_agent, self.path, options)
        self.process.wait_for_line("ready", timeout=30)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
        self.stream = self.sock.makefile("rw")

    def send(self, op: str, p: plan.Plan, **fields: Any) -> dict[str, Any]:
        self.stream.write(json.dumps({"op": op, "plan": p.model_dump_json(), **fields}) + "\n")
        self.stream.flush()
        reply: dict[str, Any] = json.loads(self.stream.readline())
        assert "error" not in reply, reply["error"]
        return reply

    def sync(self, p: plan.Plan, targets: list[dict[str, Any]] | None = None, **fields: Any) -> int:
        changes: int = self.send("sync", p, targets=targets or [], **fields)["changes"]
        return changes

    def close(self) -> None:
        self.stream.close()
        self.sock.close()
        self.process.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))


def ruleset(ns: Namespace) -> str:
    return ns.run(["nft", "list", "ruleset"]).stdout


def table(ns: Namespace, family: str, name: str) -> str | None:
    done = ns.run(["nft", "list", "table", family, name], check=False)
    return done.stdout if done.returncode == 0 else None


def lo_addresses(ns: Namespace) -> list[str]:
    return [
        info["local"]
        for link in json.loads(ns.ip("-j", "addr", "show", "dev", "lo"))
        for info in link.get("addr_info", [])
        if "local" in info
    ]


def backends_of(answers: list[list[dict[str, str]]]) -> Counter[str]:
    return Counter(answer["backend"] for connection in answers for answer in connection)


def ask_again(held: Spawned) -> dict[str, str]:
    """One more request on the held connection; raises if the connection broke."""
    os.kill(held.pid, signal.SIGUSR1)
    line = held.wait_for_line("again ", timeout=20)
    assert "error" not in line.split()[1], line
    answer: dict[str, str] = json.loads(line.removeprefix("again "))
    return answer


def routed_topology(
    topo: Topology, client_address: str, lb_front: str, backends: Mapping[str, str], lb_back: str
) -> dict[str, Namespace]:
    """client -- lb -- (bridge) -- backends, each backend routing back through the LB (the nat layout,
    also what `layerlb serve` drives in test_serve_kernel)."""
    client, lb = topo.namespace("client"), topo.namespace("lb")
    topo.link(client, "eth0", lb, "eth0")
    client.addr("eth0", f"{client_address}/24")
    lb.addr("eth0", f"{lb_front}/24")
    client.route(f"default via {lb_front}")
    nodes = {"client": client, "lb": lb}
    ports = []
    for index, (name, address) in enumerate(backends.items(), start=1):
        backend = topo.namespace(name)
        topo.link(lb, f"b{index}", backend, "eth0")
        backend.addr("eth0", f"{address}/24")
        backend.route(f"default via {lb_back}")
        ports.append(f"b{index}")
        nodes[name] = backend
    topo.bridge(lb, "br0", ports, f"{lb_back}/24")
    return nodes


def start_backends(nodes: Mapping[str, Namespace], names: Iterable[str]) -> dict[str, Spawned]:
    """An HTTP backend in each named namespace, ready."""
    servers = {name: nodes[name].spawn(http_backend, name, BACKEND_PORT) for name in names}
    for server in servers.values():
        server.wait_for_line("ready", timeout=30)
    return servers


@pytest.fixture(scope="module")
def nat() -> Iterator[dict[str, Namespace]]:
    """The nat topology with HTTP backends running and a foreign table in the LB."""
    with Topology("nftnat", timeout=60) as topo:
        nodes = routed_topology(topo, CLIENT_NAT, "10.0.1.1", NAT_BACKENDS, LB_BACK)
        nodes["lb"].run(["nft", "-f", "-"], input=FOREIGN)
        start_backends(nodes, NAT_BACKENDS)
        yield nodes


@pytest.fixture(scope="module")
def dsr() -> Iterator[dict[str, Namespace]]:
    """The dsr topology: one bridge, backends owning the VIP on lo, a probe table in the LB."""
    with Topology("nftdsr", timeout=60) as topo:
        switch = topo.namespace("sw")
        nodes = {"client": topo.namespace("client"), "lb": topo.namespace("lb")}
        addresses = {"client": CLIENT_DSR, "lb": "10.0.3.1", **DSR_BACKENDS}
        nodes.update({name: topo.namespace(name) for name in DSR_BACKENDS})
        for name, node in nodes.items():
            topo.link(node, "eth0", switch, f"p-{name}")
            node.addr("eth0", f"{addresses[name]}/24")
        topo.bridge(switch, "br0", [f"p-{name}" for name in nodes])
        for name in DSR_BACKENDS:
            nodes[name].sysctl("net.ipv4.conf.all.arp_ignore", 1)
            nodes[name].sysctl("net.ipv4.conf.all.arp_announce", 2)
            nodes[name].addr("lo", f"{VIP_DSR}/32")
        nodes["lb"].run(["nft", "-f", "-"], input=DSR_PROBE)
        servers = [nodes[name].spawn(http_backend, name, DSR_PORT) for name in DSR_BACKENDS]
        for server in servers:
            server.wait_for_line("ready", timeout=30)
        yield nodes


@pytest.fixture
def agent(request: pytest.FixtureRequest) -> Iterator[Agent]:
    """An engine agent in the LB namespace of the test's topology; its tables are removed afterwards."""
    nodes: dict[str, Namespace] = request.getfixturevalue(request.param)
    lb = nodes["lb"]
    started = Agent(lb)
    yield started
    started.close()
    for family in ("ip", "netdev"):
        lb.run(["nft", "delete", "table", family, "layerlb_shop_web"], check=False)
    vip = VIP_NAT if request.param == "nat" else VIP_DSR
    lb.run(["ip", "addr", "del", f"{vip}/32", "dev", "lo"], check=False)


def nat_plan(weights: dict[str, int]) -> plan.Plan:
    return make_plan(
        api.Architecture.nat, VIP_NAT, [(NAT_BACKENDS[name], BACKEND_PORT, w) for name, w in weights.items()]
    )


def dsr_plan(names: list[str]) -> plan.Plan:
    return make_plan(api.Architecture.dsr, VIP_DSR, [(DSR_BACKENDS[name], None, 1) for name in names])


# ---- nat ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agent", ["nat"], indirect=True)
def test_nat_spreads_by_weight_and_backends_see_the_client(nat: dict[str, Namespace], agent: Agent) -> None:
    assert agent.sync(nat_plan({"be1": 3, "be2": 1})) >= 2  # the table and the VIP on lo
    answers = nat["client"].call(fetch_many, VIP_NAT, NAT_PORT, 400)
    spread = backends_of(answers)
    assert set(spread) == {"be1", "be2"}
    assert 270 <= spread["be1"] <= 330 and 70 <= spread["be2"] <= 130, spread
    assert {answer["peer"] for connection in answers for answer in connection} == {CLIENT_NAT}


def test_nat_masquerade_shows_backends_the_lb_address(nat: dict[str, Namespace]) -> None:
    masquerading = Agent(nat["lb"], masquerade=True)
    try:
        assert masquerading.sync(nat_plan({"be1": 1})) >= 1
        answers = nat["client"].call(fetch_many, VIP_NAT, NAT_PORT, 5)
        assert {answer["peer"] for connection in answers for answer in connection} == {LB_BACK}
        masquerading.send("remove", nat_plan({"be1": 1}))
    finally:
        masquerading.close()


@pytest.mark.parametrize("agent", ["nat"], indirect=True)
def test_nat_health_down_keeps_established_connections_and_up_restores(
    nat: dict[str, Namespace], agent: Agent
) -> None:
    p = nat_plan({"be1": 1, "be2": 1})
    be1, be2 = NAT_BACKENDS["be1"], NAT_BACKENDS["be2"]
    agent.sync(p)
    held = nat["client"].spawn(hold_connection, VIP_NAT, NAT_PORT, "be2")
    held.wait_for_line("held be2", timeout=30)

    assert agent.sync(p, [target(be1, BACKEND_PORT), target(be2, BACKEND_PORT, healthy=False)]) == 1
    assert backends_of(nat["client"].call(fetch_many, VIP_NAT, NAT_PORT, 40)) == {"be1": 40}
    assert ask_again(held) == {"backend": "be2", "peer": CLIENT_NAT}  # conntrack kept it on be2

    assert agent.sync(p, [target(be1, BACKEND_PORT), target(be2, BACKEND_PORT)]) == 1
    assert backends_of(nat["client"].call(fetch_many, VIP_NAT, NAT_PORT, 40)) == {"be1": 20, "be2": 20}
    assert ask_again(held)["backend"] == "be2"
    held.stop()


@pytest.mark.parametrize("agent", ["nat"], indirect=True)
def test_nat_drain_sends_new_connections_elsewhere_and_lets_open_ones_finish(
    nat: dict[str, Namespace], agent: Agent
) -> None:
    be1, be2, be3 = NAT_BACKENDS.values()
    agent.sync(nat_plan({"be1": 1, "be2": 1, "be3": 1}))
    held = nat["client"].spawn(hold_connection, VIP_NAT, NAT_PORT, "be3")
    held.wait_for_line("held be3", timeout=30)

    # be3 left the Plan; the data plane reports it draining with one open connection.
    targets = [target(be1, BACKEND_PORT), target(be2, BACKEND_PORT), target(be3, BACKEND_PORT)]
    targets[2].update(draining=True, active=1)
    assert agent.sync(nat_plan({"be1": 1, "be2": 1}), targets) == 1
    assert backends_of(nat["client"].call(fetch_many, VIP_NAT, NAT_PORT, 40)) == {"be1": 20, "be2": 20}
    assert ask_again(held) == {"backend": "be3", "peer": CLIENT_NAT}
    assert ask_again(held)["backend"] == "be3"
    held.stop()


@pytest.mark.parametrize("agent", ["nat"], indirect=True)
def test_nat_resync_restart_and_remove_touch_nothing_else(nat: dict[str, Namespace], agent: Agent) -> None:
    lb = nat["lb"]
    other = make_plan(
        api.Architecture.nat, "10.0.100.2", [(NAT_BACKENDS["be3"], BACKEND_PORT, 1)], name="other"
    )
    agent.sync(other)
    foreign, other_table = table(lb, "inet", "foreign"), table(lb, "ip", "layerlb_shop_other")
    assert foreign is not None and other_table is not None

    p = nat_plan({"be1": 2, "be2": 1})
    assert agent.sync(p) >= 1
    before = ruleset(lb)
    assert 'comment "layerlb sha256:' in before
    assert agent.sync(p) == 0  # the same instance: nothing to do
    assert ruleset(lb) == before

    held = nat["client"].spawn(hold_connection, VIP_NAT, NAT_PORT, "be2")
    held.wait_for_line("held be2", timeout=30)
    agent.close()
    restarted = Agent(lb)  # a restarted data plane adopts the table: no transaction, no flow disturbed
    try:
        assert restarted.sync(p) == 0
        assert ruleset(lb) == before
        assert ask_again(held)["backend"] == "be2"
        assert backends_of(nat["client"].call(fetch_many, VIP_NAT, NAT_PORT, 30)) == {"be1": 20, "be2": 10}

        restarted.send("remove", p)
        assert restarted.sync(p) == 2  # after remove, both the table and the VIP come back
        assert restarted.sync(p) == 0
        assert table(lb, "inet", "foreign") == foreign
        assert table(lb, "ip", "layerlb_shop_other") == other_table

        restarted.send("remove", p)
        assert table(lb, "ip", "layerlb_shop_web") is None
        assert VIP_NAT not in lo_addresses(lb)
        assert table(lb, "inet", "foreign") == foreign
        assert table(lb, "ip", "layerlb_shop_other") == other_table
        assert "10.0.100.2" in lo_addresses(lb)
        restarted.send("remove", other)
        assert table(lb, "ip", "layerlb_shop_other") is None
        assert table(lb, "inet", "foreign") == foreign
    finally:
        held.stop()
        restarted.close()


@pytest.mark.parametrize("agent", ["nat"], indirect=True)
def test_nat_reloads_a_table_edited_behind_its_back(nat: dict[str, Namespace], agent: Agent) -> None:
    p = nat_plan({"be1": 1})
    agent.sync(p)
    before = table(nat["lb"], "ip", "layerlb_shop_web")
    nat["lb"].run(["nft", "flush", "chain", "ip", "layerlb_shop_web", "balance"])
    assert agent.sync(p) == 1
    assert table(nat["lb"], "ip", "layerlb_shop_web") == before


# ---- dsr ----------------------------------------------------------------------------------------------


def probe_counters(lb: Namespace) -> tuple[int, int]:
    """(client packets to the VIP seen by the LB, backend replies from the VIP seen by the LB)."""
    listing = json.loads(lb.run(["nft", "-j", "list", "table", "netdev", "probe"]).stdout)
    counts = [
        expr["counter"]["packets"]
        for item in listing["nftables"]
        if "rule" in item
        for expr in item["rule"]["expr"]
        if "counter" in expr
    ]
    return counts[0], counts[1]


@pytest.mark.parametrize("agent", ["dsr"], indirect=True)
def test_dsr_replies_bypass_the_lb_and_flows_stay_on_one_backend(
    dsr: dict[str, Namespace], agent: Agent
) -> None:
    lb = dsr["lb"]
    desired = agent.send("desired", dsr_plan(["be1", "be2"]))
    macs = {
        name: json.loads(dsr[name].ip("-j", "link", "show", "eth0"))[0]["address"] for name in DSR_BACKENDS
    }
    assert desired["device"] == "eth0"
    assert desired["neighbours"] == {DSR_BACKENDS[name]: mac for name, mac in macs.items()}
    assert agent.sync(dsr_plan(["be1", "be2"])) >= 2
    assert agent.sync(dsr_plan(["be1", "be2"])) == 0
    to_vip_before, from_vip_before = probe_counters(lb)

    answers = dsr["client"].call(fetch_many, VIP_DSR, DSR_PORT, 100, 3)
    assert all(len({answer["backend"] for answer in connection}) == 1 for connection in answers)  # per flow
    spread = backends_of(answers)
    assert set(spread) == {"be1", "be2"} and min(spread.values()) >= 60, spread
    assert {answer["peer"] for connection in answers for answer in connection} == {CLIENT_DSR}

    to_vip, from_vip = probe_counters(lb)
    assert to_vip - to_vip_before >= 100 * 5  # SYN, 3 requests, FIN... of each connection: the LB sees them
    assert from_vip - from_vip_before == 0  # and none of the backends' replies


@pytest.mark.parametrize("agent", ["dsr"], indirect=True)
def test_dsr_health_down_keeps_flows_of_healthy_backends(dsr: dict[str, Namespace], agent: Agent) -> None:
    be1, be2 = DSR_BACKENDS.values()
    p = dsr_plan(["be1", "be2"])
    agent.sync(p)
    held = dsr["client"].spawn(hold_connection, VIP_DSR, DSR_PORT, "be1")
    held.wait_for_line("held be1", timeout=30)

    assert agent.sync(p, [target(be1, None), target(be2, None, healthy=False)]) == 1
    assert backends_of(dsr["client"].call(fetch_many, VIP_DSR, DSR_PORT, 30)) == {"be1": 30}
    assert ask_again(held)["backend"] == "be1"  # the map kept its size: be1's flows did not move

    assert agent.sync(p, [target(be1, None), target(be2, None)]) == 1
    assert set(backends_of(dsr["client"].call(fetch_many, VIP_DSR, DSR_PORT, 40))) == {"be1", "be2"}
    assert ask_again(held)["backend"] == "be1"
    held.stop()


@pytest.mark.parametrize("agent", ["dsr"], indirect=True)
def test_dsr_drain_keeps_the_slots_until_the_drain_time_ends(dsr: dict[str, Namespace], agent: Agent) -> None:
    be1, be2 = DSR_BACKENDS.values()
    agent.sync(dsr_plan(["be1", "be2"]), drain_seconds=3600)
    before = table(dsr["lb"], "netdev", "layerlb_shop_web")
    held = dsr["client"].spawn(hold_connection, VIP_DSR, DSR_PORT, "be2")
    held.wait_for_line("held be2", timeout=30)

    draining = [target(be1, None), target(be2, None, draining=True, active=1)]
    assert agent.sync(dsr_plan(["be1"]), draining) == 0  # be2 keeps its hash slots: the same ruleset
    assert table(dsr["lb"], "netdev", "layerlb_shop_web") == before
    assert ask_again(held)["backend"] == "be2"

    assert agent.sync(dsr_plan(["be1"]), draining, drain_seconds=0) == 1  # the drain time is over
    assert backends_of(dsr["client"].call(fetch_many, VIP_DSR, DSR_PORT, 30)) == {"be1": 30}
    held.stop()


@pytest.mark.parametrize("agent", ["dsr"], indirect=True)
def test_dsr_restart_adopts_and_remove_cleans_up(dsr: dict[str, Namespace], agent: Agent) -> None:
    lb = dsr["lb"]
    p = dsr_plan(["be1", "be2"])
    agent.sync(p)
    before = table(lb, "netdev", "layerlb_shop_web")
    agent.close()
    restarted = Agent(lb)
    try:
        assert restarted.sync(p) == 0
        assert table(lb, "netdev", "layerlb_shop_web") == before
        restarted.send("remove", p)
        assert table(lb, "netdev", "layerlb_shop_web") is None
        assert VIP_DSR not in lo_addresses(lb)
        assert table(lb, "netdev", "probe") is not None
    finally:
        restarted.close()


# ---- the VIP reaches the listeners, not the node's own services (issue #18) ------------------------------


def node_service(port: int) -> None:
    """A TCP service on the node's wildcard address, as sshd, the kubelet or a host-network admin port
    listen: it says "node" to every connection."""
    server = socket.create_server(("0.0.0.0", port), backlog=64)
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"node\n")


def connect_outcome(address: str, port: int) -> str:
    """What a TCP client gets from `address:port`: the first line served, "refused", or "timeout"."""
    try:
        with socket.create_connection((address, port), timeout=15) as connection:
            return connection.makefile().readline().strip() or "closed"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


@contextlib.contextmanager
def serving_on_the_node(lb: Namespace) -> Iterator[None]:
    """`node_service` on NODE_SERVICE_PORT of the LB namespace's wildcard address, while the block runs."""
    service = lb.spawn(node_service, NODE_SERVICE_PORT)
    try:
        service.wait_for_line("ready", timeout=30)
        yield
    finally:
        service.stop()


@pytest.mark.parametrize("agent", ["nat"], indirect=True)
def test_nat_vip_serves_its_listeners_and_not_the_nodes_own_ports(
    nat: dict[str, Namespace], agent: Agent
) -> None:
    client = nat["client"]
    agent.sync(nat_plan({"be1": 1}))
    with serving_on_the_node(nat["lb"]):
        assert client.call(connect_outcome, "10.0.1.1", NODE_SERVICE_PORT) == "node"  # the node's own address
        assert client.call(connect_outcome, VIP_NAT, NODE_SERVICE_PORT) == "refused"  # a TCP reset, at once
        assert backends_of(client.call(fetch_many, VIP_NAT, NAT_PORT, 5)) == {"be1": 5}
    client.run(["ping", "-c", "1", "-W", "10", VIP_NAT])  # ICMP stays allowed


@pytest.mark.parametrize("agent", ["nat"], indirect=True)
def test_nat_leaves_a_vip_that_is_the_nodes_own_address_unguarded(
    nat: dict[str, Namespace], agent: Agent
) -> None:
    own = make_plan(api.Architecture.nat, "10.0.1.1", [(NAT_BACKENDS["be1"], BACKEND_PORT, 1)])
    assert "reject" not in agent.send("desired", own)["ruleset"]  # sshd on the node's address stays
    assert "reject" in agent.send("desired", nat_plan({"be1": 1}))["ruleset"]


@pytest.mark.parametrize("agent", ["dsr"], indirect=True)
def test_dsr_vip_serves_its_listeners_and_not_the_nodes_own_ports(
    dsr: dict[str, Namespace], agent: Agent
) -> None:
    client = dsr["client"]
    agent.sync(dsr_plan(["be1", "be2"]))
    with serving_on_the_node(dsr["lb"]):
        assert client.call(connect_outcome, "10.0.3.1", NODE_SERVICE_PORT) == "node"
        assert client.call(connect_outcome, VIP_DSR, NODE_SERVICE_PORT) == "refused"
        assert set(backends_of(client.call(fetch_many, VIP_DSR, DSR_PORT, 20))) <= {"be1", "be2"}
    client.run(["ping", "-c", "1", "-W", "10", VIP_DSR])


# ---- the bench figure (printed, never asserted on time) -------------------------------------------------


def test_sync_of_1008_services_by_10_servers_then_a_noop(capsys: pytest.CaptureFixture[str]) -> None:
    plans = [
        make_plan(
            api.Architecture.nat,
            f"10.200.{index}.1",
            [(f"10.201.{index}.{server}", 8080, 1) for server in range(1, 11)],
            name=f"bench{index}",
            ports=tuple(range(1000, 1063)),
        )
        for index in range(16)
    ]
    assert all(nftables_ruleset.unsupported(p) is None for p in plans)
    with Topology("nftbench", timeout=120) as topo:
        figures = topo.namespace("lb").call(bench_sync, [p.model_dump_json() for p in plans], 10)
    assert figures["services"] == 16 * 63
    assert figures["first_changes"] == 16 * 2 + 1  # a table and a VIP per Plan, forwarding once
    assert figures["noop_changes"] == 0
    with capsys.disabled():
        print(
            f"\nnftables sync: {figures['services']:.0f} virtual services x {figures['servers']:.0f} servers "
            f"in {figures['plans']:.0f} Plans: first {figures['first_seconds'] * 1000:.0f} ms, "
            f"no-op {figures['noop_seconds'] * 1000:.1f} ms (render alone {figures['render_seconds'] * 1000:.0f} ms)"
        )


def test_nft_command_and_libnftables_agree_and_an_architecture_change_leaves_no_table() -> None:
    with Topology("nftbare") as topo:
        facts = topo.namespace("lb").call(engines_agree_and_switch_families)
    assert facts == {
        "command_first": 3,  # the table, the VIP, IPv6 forwarding
        "library_adopts": 0,
        "command_again": 0,
        "vip_local": True,
        "vip_after_remove": False,
        "table_after_remove": [],
        "before_switch": ["ip"],
        "switch_changes": 1,  # one transaction: the netdev table in, the ip table out
        "after_switch": ["netdev"],
        "unresolved": ["10.0.9.2"],  # nobody answers ARP there: treated as down, no rule
        "dsr_rules": 0,
    }


# ---- the pure parts of the engine -----------------------------------------------------------------------


def test_a_down_dsr_endpoint_hands_its_slots_to_the_others_and_the_total_stays() -> None:
    slots = [
        nftables._Slot("a", None, 2, True),
        nftables._Slot("b", None, 3, False),
        nftables._Slot("c", None, 1, True),
    ]
    spread = nftables._spread(slots)
    assert [(e.address, e.weight) for e in spread] == [("a", 2), ("a", 1), ("c", 1), ("a", 1), ("c", 1)]
    assert sum(e.weight for e in spread) == 6
    ranges = nftables_ruleset.weight_ranges([e.weight for e in spread])
    assert ranges[0] == (0, 1) and ranges[-1] == (5, 5)  # a and c keep exactly the slots they had
    nobody = nftables._spread([nftables._Slot("a", None, 2, False)])
    assert [e.weight for e in nobody] == [0]


def test_a_draining_endpoint_returns_to_its_place_in_the_layout() -> None:
    a, b, c, d = (("a", None), ("b", None), ("c", None), ("d", None))
    assert nftables._merge_layout([a, c], [b], [a, b, c]) == [a, b, c]
    assert nftables._merge_layout([c, d], [a, b], [a, b, c]) == [a, b, c, d]
    assert nftables._merge_layout([a], [d], []) == [a, d]  # unknown place: last


def test_the_digest_ignores_comments_and_blank_lines() -> None:
    one = "# generation 1\ntable ip t {\n\tchain c {\n\t}\n}\n"
    two = "# generation 2\n\ntable ip t {\n  # listener http\n\tchain c {\n\t}\n}\n"
    assert nftables.ruleset_digest(one) == nftables.ruleset_digest(two)
    assert nftables.ruleset_digest(one) != nftables.ruleset_digest(one.replace("chain c", "chain d"))

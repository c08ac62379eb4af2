"""The IPVS engine's sync on a fake kernel (`fake_ipvs`): what it writes for a Plan, what it leaves alone,
and how removed real servers and listeners drain, checked on whole table dumps. The guest tests
(`test_ipvs_guest.py`) prove the same behaviours against Debian's kernel with real packets."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from layerlb_dataplane.core.targets import Target
from layerlb_dataplane.kernel.ipvs import engine, table

from layerlb import api, plan
from tests.clock import Clock
from tests.kernel import guest_scenarios as scenarios
from tests.kernel.fake_ipvs import CONNECTION_HEADER, FakeIpvs, FakeVips

VIP = "10.0.100.1"
TCP = table.ServiceKey("TCP", VIP, 80)
UDP = table.ServiceKey("UDP", VIP, 53)
BE1, BE2 = ("10.0.2.11", 8080), ("10.0.2.12", 8080)
TWO = ((*BE1, 1), (*BE2, 2))
BOTH = (("tcp", 80, "TCP"), ("dns", 53, "UDP"))


def make_plan(
    endpoints: Sequence[tuple[str, int, int]] = TWO,
    *,
    vip: str = VIP,
    listeners: Sequence[tuple[str, int, str]] = BOTH,
    architecture: api.Architecture = api.Architecture.nat,
    algorithm: api.Algorithm = api.Algorithm.round_robin,
    affinity: api.AffinityType = api.AffinityType.None_,
) -> plan.Plan:
    """An L4 IPVS Plan with one backend serving every listener (a new object each time, as a new Plan is)."""
    return scenarios.make_plan(
        "web", vip, architecture, endpoints, listeners=listeners, algorithm=algorithm, affinity=affinity,
        namespace="shop",
    )  # fmt: skip


@pytest.fixture
def ipvs() -> FakeIpvs:
    return FakeIpvs()


@pytest.fixture
def vips() -> FakeVips:
    return FakeVips()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lb(ipvs: FakeIpvs, vips: FakeVips, clock: Clock) -> engine.IpvsEngine:
    return engine.IpvsEngine(ipvs=ipvs, vips=vips, clock=clock, drain_seconds=30)


def conn(state: str, server: tuple[str, int], service: table.ServiceKey = TCP) -> str:
    """One /proc/net/ip_vs_conn line (IPv4 in hex) for a client connection to `server` through `service`."""

    def hexed(address: str, port: int) -> str:
        return f"{''.join(f'{int(part):02X}' for part in address.split('.'))} {port:04X}"

    return f"{service.protocol} {hexed('10.0.1.2', 50000)} {hexed(service.address, service.port)} {hexed(*server)} {state} 100\n"


# --- the table a Plan gives --------------------------------------------------------------------------


def test_a_first_sync_writes_the_render_and_a_second_writes_nothing(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, vips: FakeVips
) -> None:
    p = make_plan()
    report = lb.sync(p, {})
    assert ipvs.lines() == [
        "-A -t 10.0.100.1:80 -s wrr",
        "-a -t 10.0.100.1:80 -r 10.0.2.11:8080 -m -w 1",
        "-a -t 10.0.100.1:80 -r 10.0.2.12:8080 -m -w 2",
        "-A -u 10.0.100.1:53 -s wrr",
        "-a -u 10.0.100.1:53 -r 10.0.2.11:8080 -m -w 1",
        "-a -u 10.0.100.1:53 -r 10.0.2.12:8080 -m -w 2",
    ]
    assert report.changes == 6 + 1 + 1  # the table, the VIP, ip_forward
    assert vips.local == {VIP}
    assert ipvs.sysctls == {"net/ipv4/ip_forward": "1"}
    assert lb.sync(p, {}).changes == 0
    assert lb.sync(make_plan(), {}).changes == 0  # an equal Plan, new object: full compare, no write
    assert len(ipvs.batches) == 1


def test_a_changed_weight_edits_only_that_real_server(lb: engine.IpvsEngine, ipvs: FakeIpvs) -> None:
    lb.sync(make_plan(), {})
    report = lb.sync(make_plan(((*BE1, 1), (*BE2, 3))), {})
    assert ipvs.batches[-1] == [
        "-e -t 10.0.100.1:80 -r 10.0.2.12:8080 -m -w 3",
        "-e -u 10.0.100.1:53 -r 10.0.2.12:8080 -m -w 3",
    ]
    assert report.changes == 2
    assert ipvs.server(TCP, *BE2).weight == 3


def test_an_unhealthy_target_gets_weight_zero_and_its_weight_back(
    lb: engine.IpvsEngine, ipvs: FakeIpvs
) -> None:
    p = make_plan(listeners=BOTH[:1])
    be2 = Target("app", *BE2, weight=2)
    lb.sync(p, {"app": [be2]})
    be2.health.healthy = False
    lb.sync(p, {"app": [be2]})
    assert ipvs.batches[-1] == ["-e -t 10.0.100.1:80 -r 10.0.2.12:8080 -m -w 0"]
    be2.health.healthy = True
    lb.sync(p, {"app": [be2]})
    assert ipvs.batches[-1] == ["-e -t 10.0.100.1:80 -r 10.0.2.12:8080 -m -w 2"]


def test_a_hand_edited_weight_is_seen_and_put_back(lb: engine.IpvsEngine, ipvs: FakeIpvs) -> None:
    p = make_plan()
    lb.sync(p, {})
    ipvs.server(TCP, *BE1).weight = 5
    assert lb.sync(p, {}).changes == 1
    assert ipvs.batches[-1] == ["-e -t 10.0.100.1:80 -r 10.0.2.11:8080 -m -w 1"]


def test_a_real_server_the_kernel_reports_as_local_is_not_edited(
    lb: engine.IpvsEngine, ipvs: FakeIpvs
) -> None:
    """IPVS shows a real server that is this node as `Local` whatever method it was given."""
    p = make_plan()
    lb.sync(p, {})
    ipvs.server(TCP, *BE1).forward = table.LOCAL
    assert lb.sync(p, {}).changes == 0


def test_a_scheduler_flag_removed_by_hand_is_restored_by_the_settings_check(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, clock: Clock
) -> None:
    """The fingerprint does not show scheduler flags (as /proc does not); the settings dump every
    `full_check_seconds` does."""
    p = make_plan(listeners=BOTH[:1], algorithm=api.Algorithm.source_hash)
    lb.sync(p, {})
    assert ipvs.lines()[0] == "-A -t 10.0.100.1:80 -s sh -b sh-fallback"
    ipvs.services_by_key[TCP].flags = None
    assert lb.sync(p, {}).changes == 0  # the fast path: fingerprint unchanged, settings checked lately
    clock.now += engine.DEFAULT_FULL_CHECK_SECONDS
    assert lb.sync(p, {}).changes == 1
    assert ipvs.batches[-1] == ["-E -t 10.0.100.1:80 -s sh -b sh-fallback"]


def test_services_on_other_addresses_are_left_alone_and_remove_takes_only_the_vips(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, vips: FakeVips
) -> None:
    foreign = table.ServiceKey("TCP", "10.0.100.9", 80)
    ipvs.services_by_key[foreign] = table.VirtualService(foreign, "rr", None)
    stale = table.ServiceKey("TCP", VIP, 8443)  # a listener gone while the engine was down: layerlb's
    ipvs.services_by_key[stale] = table.VirtualService(stale, "rr", None)
    p = make_plan()
    lb.sync(p, {})
    assert "-D -t 10.0.100.1:8443" in ipvs.written()
    lb.remove(p)
    assert ipvs.lines() == ["-A -t 10.0.100.9:80 -s rr"]
    assert vips.removed == [VIP]
    assert lb.next_resync(p) is None


def test_a_restarted_engine_adopts_the_table_without_writing(ipvs: FakeIpvs, vips: FakeVips) -> None:
    engine.IpvsEngine(ipvs=ipvs, vips=vips).sync(make_plan(), {})
    assert engine.IpvsEngine(ipvs=ipvs, vips=vips).sync(make_plan(), {}).changes == 0
    assert len(ipvs.batches) == 1


def test_a_moved_vip_takes_its_services_and_address_along(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, vips: FakeVips
) -> None:
    lb.sync(make_plan(), {})
    lb.sync(make_plan(vip="10.0.100.2"), {})
    assert {key.address for key in ipvs.services_by_key} == {"10.0.100.2"}
    assert vips.removed == [VIP] and vips.local == {"10.0.100.2"}


def test_two_plans_on_one_vip_are_refused(lb: engine.IpvsEngine) -> None:
    lb.sync(make_plan(), {})
    other = make_plan().model_copy(update={"name": "other"})
    with pytest.raises(ValueError, match=re.escape("VIP 10.0.100.1 is already shop/web's")):
        lb.sync(other, {})


def test_refused_changes_are_named_in_ipvsadm_words(lb: engine.IpvsEngine, ipvs: FakeIpvs) -> None:
    ipvs.refuse["-a"] = "no such service"
    with pytest.raises(table.IpvsError) as caught:
        lb.sync(make_plan(listeners=BOTH[:1]), {})
    assert str(caught.value) == (
        "IPVS refused 2 of 3 change(s): `-a -t 10.0.100.1:80 -r 10.0.2.11:8080 -m -w 1`: no such service; "
        "`-a -t 10.0.100.1:80 -r 10.0.2.12:8080 -m -w 2`: no such service"
    )


# --- drains ------------------------------------------------------------------------------------------


def test_a_removed_backend_drains_at_weight_zero_until_its_connections_end(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, clock: Clock
) -> None:
    lb.sync(make_plan(), {})
    ipvs.server(TCP, *BE2).active = 1
    one = make_plan(((*BE1, 1),))
    lb.sync(one, {})
    assert ipvs.batches[-1] == [
        "-E -t 10.0.100.1:80 -s rr",  # one endpoint left: the render's rr
        "-e -t 10.0.100.1:80 -r 10.0.2.12:8080 -m -w 0",
        "-E -u 10.0.100.1:53 -s rr",
        "-e -u 10.0.100.1:53 -r 10.0.2.12:8080 -m -w 0",
    ]
    assert lb.next_resync(one) == clock.now + 1  # poll again in a second
    clock.now += 1
    ipvs.connection_table += conn("ESTABLISHED", BE2)
    assert lb.sync(one, {}).changes == 1  # the UDP twin had no flow: deleted; the TCP one waits
    assert ipvs.batches[-1] == ["-d -u 10.0.100.1:53 -r 10.0.2.12:8080"]
    ipvs.server(TCP, *BE2).active = 0
    ipvs.connection_table = CONNECTION_HEADER
    clock.now += 1
    lb.sync(one, {})
    assert ipvs.batches[-1] == ["-d -t 10.0.100.1:80 -r 10.0.2.12:8080"]
    assert lb.next_resync(one) is None
    assert ipvs.lines() == [
        "-A -t 10.0.100.1:80 -s rr",
        "-a -t 10.0.100.1:80 -r 10.0.2.11:8080 -m -w 1",
        "-A -u 10.0.100.1:53 -s rr",
        "-a -u 10.0.100.1:53 -r 10.0.2.11:8080 -m -w 1",
    ]


@pytest.mark.parametrize("state", ["TIME_WAIT", "CLOSE"])
def test_a_tcp_server_whose_connection_entries_are_all_over_is_deleted(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, state: str
) -> None:
    """IPVS keeps finished TCP connections (inactive) for up to two minutes; deleting the server cannot
    disturb them, so the drain does not wait for them."""
    one = make_plan(((*BE1, 1),), listeners=BOTH[:1])
    lb.sync(make_plan(listeners=BOTH[:1]), {})
    ipvs.server(TCP, *BE2).inactive = 2
    ipvs.connection_table += conn(state, BE2) + conn(state, BE2).replace("C350", "C351")
    lb.sync(one, {})  # weight 0
    lb.sync(one, {})
    assert ipvs.batches[-1] == ["-d -t 10.0.100.1:80 -r 10.0.2.12:8080"]


def test_an_inactive_tcp_entry_that_is_not_over_keeps_the_server(
    lb: engine.IpvsEngine, ipvs: FakeIpvs
) -> None:
    one = make_plan(((*BE1, 1),), listeners=BOTH[:1])
    lb.sync(make_plan(listeners=BOTH[:1]), {})
    ipvs.server(TCP, *BE2).inactive = 1
    ipvs.connection_table += conn("TIME_WAIT", BE2) + conn("SYN_RECV", BE2).replace("C350", "C352")
    lb.sync(one, {})
    assert lb.sync(one, {}).changes == 0
    assert (TCP, BE2) in {(k, s) for k, service in ipvs.services_by_key.items() for s in service.servers}


def test_a_drain_ends_at_the_drain_timeout_even_with_open_connections(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, clock: Clock
) -> None:
    one = make_plan(((*BE1, 1),), listeners=BOTH[:1])
    lb.sync(make_plan(listeners=BOTH[:1]), {})
    ipvs.server(TCP, *BE2).active = 3
    started = clock.now
    lb.sync(one, {})
    clock.now = started + 29
    assert lb.sync(one, {}).changes == 0
    assert lb.next_resync(one) == started + 30  # the drain's end comes before the next poll
    clock.now = started + 30
    assert lb.sync(one, {}).changes == 1
    assert ipvs.batches[-1] == ["-d -t 10.0.100.1:80 -r 10.0.2.12:8080"]
    assert lb.next_resync(one) is None


def test_a_draining_target_drains_like_a_removed_endpoint(lb: engine.IpvsEngine, ipvs: FakeIpvs) -> None:
    p = make_plan(listeners=BOTH[:1])
    lb.sync(p, {})
    lb.sync(p, {"app": [Target("app", *BE2, weight=2, draining=True)]})
    assert ipvs.batches[-1][-1] == "-e -t 10.0.100.1:80 -r 10.0.2.12:8080 -m -w 0"
    lb.sync(p, {"app": [Target("app", *BE2, weight=2, draining=True)]})
    assert ipvs.batches[-1] == ["-d -t 10.0.100.1:80 -r 10.0.2.12:8080"]


def test_a_backend_back_in_the_plan_during_its_drain_gets_its_weight_again(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, clock: Clock
) -> None:
    lb.sync(make_plan(listeners=BOTH[:1]), {})
    ipvs.server(TCP, *BE2).active = 1
    lb.sync(make_plan(((*BE1, 1),), listeners=BOTH[:1]), {})
    back = make_plan(listeners=BOTH[:1])
    lb.sync(back, {})
    assert ipvs.server(TCP, *BE2).weight == 2
    assert lb.next_resync(back) is None
    clock.now += 60  # no stale drain deletes it later
    assert lb.sync(make_plan(listeners=BOTH[:1]), {}).changes == 0


def test_a_removed_listener_drains_and_its_service_goes_with_its_last_server(
    lb: engine.IpvsEngine, ipvs: FakeIpvs
) -> None:
    lb.sync(make_plan(), {})
    ipvs.server(UDP, *BE1).inactive = 4  # UDP flows count as inactive until IPVS expires them
    tcp_only = make_plan(listeners=BOTH[:1])
    lb.sync(tcp_only, {})
    assert ipvs.batches[-1] == [  # in the kernel's list order: the last added first
        "-e -u 10.0.100.1:53 -r 10.0.2.12:8080 -m -w 0",
        "-e -u 10.0.100.1:53 -r 10.0.2.11:8080 -m -w 0",
    ]
    lb.sync(tcp_only, {})
    assert ipvs.batches[-1] == ["-d -u 10.0.100.1:53 -r 10.0.2.12:8080"]  # BE1 still has flows
    ipvs.server(UDP, *BE1).inactive = 0
    lb.sync(tcp_only, {})
    assert ipvs.batches[-1] == ["-D -u 10.0.100.1:53"]
    assert [line for line in ipvs.lines() if " -u " in line] == []
    assert lb.next_resync(tcp_only) is None


def test_remove_deletes_at_once_without_draining(lb: engine.IpvsEngine, ipvs: FakeIpvs) -> None:
    p = make_plan()
    lb.sync(p, {})
    ipvs.server(TCP, *BE1).active = 7
    lb.remove(p)
    assert ipvs.batches[-1] == ["-D -t 10.0.100.1:80", "-D -u 10.0.100.1:53"]
    assert ipvs.lines() == []


# --- persistence and IPv6 ----------------------------------------------------------------------------


def test_client_ip_affinity_is_persistence_with_expire_quiescent_template(
    lb: engine.IpvsEngine, ipvs: FakeIpvs
) -> None:
    """Without `expire_quiescent_template`, a client whose persistence template points at a weight-0
    server keeps being sent there."""
    lb.sync(
        make_plan(listeners=BOTH[:1], algorithm=api.Algorithm.maglev, affinity=api.AffinityType.ClientIP), {}
    )
    assert ipvs.lines()[0] == "-A -t 10.0.100.1:80 -s mh -b mh-fallback -p 600"
    assert ipvs.sysctls["net/ipv4/vs/expire_quiescent_template"] == "1"


def test_without_affinity_or_when_told_not_to_the_template_sysctl_is_left_alone(ipvs: FakeIpvs) -> None:
    engine.IpvsEngine(ipvs=ipvs, vips=FakeVips()).sync(make_plan(), {})
    sticky = make_plan(affinity=api.AffinityType.ClientIP, vip="10.0.100.2")
    engine.IpvsEngine(ipvs=ipvs, vips=FakeVips(), expire_quiescent=False).sync(sticky, {})
    assert "net/ipv4/vs/expire_quiescent_template" not in ipvs.sysctls


def test_an_ipv6_vip_programs_reads_and_drains(lb: engine.IpvsEngine, ipvs: FakeIpvs, vips: FakeVips) -> None:
    v6 = "fd00:100::1"
    servers = (("fd00:2::11", 8080, 1), ("fd00:2::12", 8080, 3))
    p = make_plan(servers, vip="fd00:100:0::1", listeners=BOTH[:1], affinity=api.AffinityType.ClientIP)
    lb.sync(p, {})
    assert ipvs.lines() == [
        "-A -t [fd00:100::1]:80 -s wrr -p 600",
        "-a -t [fd00:100::1]:80 -r [fd00:2::11]:8080 -m -w 1",
        "-a -t [fd00:100::1]:80 -r [fd00:2::12]:8080 -m -w 3",
    ]
    assert vips.local == {v6}
    assert ipvs.sysctls["net/ipv6/conf/all/forwarding"] == "1"
    assert lb.sync(p, {}).changes == 0
    key = table.ServiceKey("TCP", v6, 80)
    ipvs.server(key, "fd00:2::12", 8080).inactive = 1
    # /proc/net/ip_vs_conn writes IPv6 addresses in colon form
    ipvs.connection_table += (
        "TCP fd00:0001:0000:0000:0000:0000:0000:0002 C350 fd00:0100:0000:0000:0000:0000:0000:0001 0050 "
        "fd00:0002:0000:0000:0000:0000:0000:0012 1F90 FIN_WAIT 100\n"
    )
    one = make_plan(servers[:1], vip=v6, listeners=BOTH[:1], affinity=api.AffinityType.ClientIP)
    lb.sync(one, {})
    assert lb.sync(one, {}).changes == 0  # a connection that is not over
    ipvs.connection_table = CONNECTION_HEADER
    lb.sync(one, {})
    assert ipvs.batches[-1] == ["-d -t [fd00:100::1]:80 -r [fd00:2::12]:8080"]


# --- flows that change node (ECMP): the same Maglev table on every node --------------------------------

BE3 = ("10.0.2.13", 8080)
THREE = ((*BE1, 1), (*BE2, 1), (*BE3, 1))


def order(ipvs: FakeIpvs, key: table.ServiceKey = TCP) -> list[tuple[str, int]]:
    """The kernel's list of the service's real servers, head first (as /proc/net/ip_vs shows it)."""
    return list(ipvs.services_by_key[key].servers)


@pytest.mark.parametrize("architecture", [api.Architecture.dsr, api.Architecture.tunnel])
def test_dsr_and_tunnel_hash_every_flow_with_maglev_and_schedule_mid_flow_packets(
    lb: engine.IpvsEngine, ipvs: FakeIpvs, architecture: api.Architecture
) -> None:
    """round-robin becomes mh with mh-port, and sloppy_tcp/sloppy_sctp let a node schedule a connection
    whose SYN went to another node."""
    lb.sync(make_plan(architecture=architecture, listeners=BOTH[:1]), {})
    forward = "-g" if architecture is api.Architecture.dsr else "-i"
    assert ipvs.lines() == [
        "-A -t 10.0.100.1:80 -s mh -b mh-fallback,mh-port",
        f"-a -t 10.0.100.1:80 -r 10.0.2.11:8080 {forward} -w 1",
        f"-a -t 10.0.100.1:80 -r 10.0.2.12:8080 {forward} -w 2",
    ]
    assert ipvs.sysctls == {"net/ipv4/vs/sloppy_tcp": "1", "net/ipv4/vs/sloppy_sctp": "1"}


def test_nat_and_an_engine_told_not_to_leave_the_sloppy_sysctls_alone(ipvs: FakeIpvs) -> None:
    engine.IpvsEngine(ipvs=ipvs, vips=FakeVips()).sync(make_plan(), {})
    dsr = make_plan(architecture=api.Architecture.dsr, vip="10.0.100.2")
    engine.IpvsEngine(ipvs=ipvs, vips=FakeVips(), sloppy=False).sync(dsr, {})
    assert not any("sloppy" in name for name in ipvs.sysctls)


def test_a_server_added_before_others_in_order_is_added_with_them_so_every_node_has_one_table(
    clock: Clock,
) -> None:
    """mh builds its table in the order of the kernel's list, and the kernel adds at the head: a node that
    saw be2 join after be3 must hold the list a node that started with all three holds."""
    three = THREE
    fresh, grown = FakeIpvs(), FakeIpvs()
    dsr = api.Architecture.dsr
    engine.IpvsEngine(ipvs=fresh, vips=FakeVips(), clock=clock).sync(
        make_plan(three, architecture=dsr, listeners=BOTH[:1]), {}
    )
    vips = FakeVips()
    lb = engine.IpvsEngine(ipvs=grown, vips=vips, clock=clock)
    lb.sync(make_plan(three[::2], architecture=dsr, listeners=BOTH[:1]), {})
    lb.sync(make_plan(three, architecture=dsr, listeners=BOTH[:1]), {})
    assert grown.batches[-1] == [
        "-d -t 10.0.100.1:80 -r 10.0.2.13:8080",
        "-a -t 10.0.100.1:80 -r 10.0.2.12:8080 -g -w 1",
        "-a -t 10.0.100.1:80 -r 10.0.2.13:8080 -g -w 1",
    ]
    assert order(grown) == order(fresh) == [BE3, BE2, BE1]
    assert lb.sync(make_plan(three, architecture=dsr, listeners=BOTH[:1]), {}).changes == 0
    restarted = engine.IpvsEngine(ipvs=grown, vips=vips, clock=clock)
    assert restarted.sync(make_plan(three, architecture=dsr, listeners=BOTH[:1]), {}).changes == 0


def test_a_server_added_last_in_order_or_to_a_counting_scheduler_is_only_added() -> None:
    three = THREE
    cases = ((api.Architecture.dsr, three[:2], "-g"), (api.Architecture.nat, three[::2], "-m"))
    for architecture, first, method in cases:
        ipvs = FakeIpvs()
        lb = engine.IpvsEngine(ipvs=ipvs, vips=FakeVips())
        lb.sync(make_plan(first, architecture=architecture, listeners=BOTH[:1]), {})
        lb.sync(make_plan(three, architecture=architecture, listeners=BOTH[:1]), {})
        address, port, _ = next(endpoint for endpoint in three if endpoint not in first)
        assert ipvs.batches[-1] == [f"-a -t 10.0.100.1:80 -r {address}:{port} {method} -w 1"]


def test_a_down_server_keeps_its_place_in_the_list(lb: engine.IpvsEngine, ipvs: FakeIpvs) -> None:
    """Health takes a server's weight to 0 and back (`-e`): its place, and so the table, stay."""
    three = THREE
    p = make_plan(three, architecture=api.Architecture.dsr, listeners=BOTH[:1])
    lb.sync(p, {})
    down = Target("app", *BE2, 1)
    down.health.healthy = False
    lb.sync(p, {"app": [down]})
    assert [line.split()[0] for line in ipvs.batches[-1]] == ["-e"]
    lb.sync(p, {})
    assert order(ipvs) == [BE3, BE2, BE1]

"""The IPVS engine with real packets, in a QEMU guest booting Debian's kernel, because this machine's
kernel has no IPVS and no IPIP (`e2e/guest/`, recipe in TESTBEDS.md).

Each scenario of `guest_scenarios.py` is one guest boot (nat, dsr, tunnel, bench), run once per module
and shared by the tests that read its findings, so a failure names the behaviour that broke while the
number of boots stays at four. The guest runs the scenario with this interpreter (`sys.executable`, the
repository's `.venv` when the tests run from it), reaching the repository and its packages over the
read-only 9p mount of the host's root.

The first run builds the guest (kernel and modules from `apt-get download`, a busybox initramfs) into
`.cache/guest/`; it needs the Debian packages of `scripts/system-packages.sh` and nothing else.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from layerlb_dataplane.kernel.ipvs import engine, proc, table

from e2e.guest.guest import ROOT, guest_findings
from tests.kernel import guest_scenarios as scenarios

BOOT_TIMEOUT = 900.0  # seconds for one scenario boot: emulation on two shared cores is slow
_findings: dict[str, dict[str, Any]] = {}


def findings(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The findings of scenario `name`, from one guest boot per test session."""
    if name not in _findings:
        share = tmp_path_factory.mktemp(f"guest-{name}")
        _findings[name] = guest_findings(
            "tests.kernel.guest_scenarios", name, share=share, timeout=BOOT_TIMEOUT
        )
    return _findings[name]


@pytest.fixture(scope="module")
def nat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return findings("nat", tmp_path_factory)


@pytest.fixture(scope="module")
def dsr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return findings("dsr", tmp_path_factory)


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return findings("tunnel", tmp_path_factory)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return findings("bench", tmp_path_factory)


def server(address: str, port: int) -> str:
    return f"{address}:{port}"


# --- nat -----------------------------------------------------------------------------------------------

VIP, PORT, UDP = scenarios.NAT_VIP, scenarios.NAT_PORT, scenarios.UDP_PORT
TCP_SERVICE, UDP_SERVICE = f"TCP {VIP}:{PORT}", f"UDP {VIP}:{UDP}"
BE1 = server(scenarios.NAT_BACKENDS["be1"], scenarios.BACKEND_PORT)
BE2 = server(scenarios.NAT_BACKENDS["be2"], scenarios.BACKEND_PORT)


def test_nat_programs_what_the_render_says(nat: dict[str, Any]) -> None:
    """The kernel holds exactly the render's lines: services, scheduler, real servers, -m, weights."""
    assert nat["first_sync"]["changes"] > 0
    assert nat["kernel_lines"] == nat["render_lines"]
    service = nat["table_first"][TCP_SERVICE]
    assert service["scheduler"] == "wrr"
    assert {name: s["weight"] for name, s in service["servers"].items()} == {BE1: 1, BE2: 2}
    assert {s["forward"] for s in service["servers"].values()} == {"-m"}
    assert set(nat["table_first"]) == {TCP_SERVICE, UDP_SERVICE}


def test_nat_vip_on_lo_and_forwarding(nat: dict[str, Any]) -> None:
    """nat: the VIP is a local address on lo (labelled as layerlb's), and IP forwarding is on."""
    assert nat["vip_on_lo"] == [{"local": VIP, "prefixlen": 32, "label": "lo:llb"}]
    assert (nat["ip_forward_before"], nat["ip_forward_after"]) == ("0", "1")


def test_nat_balances_by_weight_and_keeps_the_client_address(nat: dict[str, Any]) -> None:
    """30 connections over weights 1:2 (wrr); every backend saw the client's own address."""
    assert nat["spread"] == {"be1": 10, "be2": 20}
    assert nat["peers"] == [scenarios.NAT_CLIENT]


def test_nat_udp(nat: dict[str, Any]) -> None:
    """UDP flows are balanced too, answered from the VIP, and the backends saw the client."""
    assert set(nat["udp_spread"]) == {"be1", "be2"}
    assert sum(nat["udp_spread"].values()) == 12
    assert nat["udp_peers"] == [scenarios.NAT_CLIENT]
    assert nat["udp_reply_sources"] == [VIP]


def test_nat_replies_pass_the_lb(nat: dict[str, Any]) -> None:
    """Masquerading: IPVS sees the replies (out packets), unlike dsr and tunnel."""
    assert nat["stats"][TCP_SERVICE]["out_packets"] > 0


def test_nat_resync_writes_nothing(nat: dict[str, Any]) -> None:
    assert nat["resync"]["changes"] == 0
    assert nat["health_down_resync"]["changes"] == 0
    assert nat["drained_resync"]["changes"] == 0


def test_nat_health_down_is_weight_zero_and_back(nat: dict[str, Any]) -> None:
    """Real probes find be2 down after the threshold (2); it gets weight 0, keeps its open connection,
    takes no new one; back up after 2 passing probes, it has its weight again and takes traffic."""
    assert nat["probes_to_down"] == scenarios.HEALTH.unhealthy_threshold
    assert nat["health_down_sync"]["changes"] == 2  # the TCP and the UDP real server
    for service in (TCP_SERVICE, UDP_SERVICE):
        assert nat["table_health_down"][service]["servers"][BE2]["weight"] == 0
    assert nat["spread_health_down"] == {"be1": 10}
    assert nat["held_during_down"] == ["be2", scenarios.NAT_CLIENT]
    assert nat["probes_to_up"] == scenarios.HEALTH.healthy_threshold
    assert nat["health_up_sync"]["changes"] == 2
    assert nat["table_health_up"][TCP_SERVICE]["servers"][BE2]["weight"] == 2
    assert nat["spread_health_up"].get("be2", 0) > 0


def test_nat_drain_of_a_removed_backend(nat: dict[str, Any]) -> None:
    """be2 leaves the Plan with a connection open: weight 0, the connection carries on, new ones go to be1,
    the server stays while the connection is open, and is deleted once it closed (well before the 30 s
    drain timeout); its UDP twin once its flows expired."""
    start = nat["table_drain_start"]
    assert start[TCP_SERVICE]["servers"][BE2]["weight"] == 0
    assert start[TCP_SERVICE]["scheduler"] == "rr"  # one endpoint left: the render's rr
    assert nat["drain_next_resync_pending"] is True
    assert nat["spread_draining"] == {"be1": 10}
    assert nat["draining_connection_answers"] == ["be2", scenarios.NAT_CLIENT]
    open_table = nat["table_drain_open"][TCP_SERVICE]["servers"]
    assert open_table[BE2]["active"] >= 1
    # A re-sync while the connection is open keeps the TCP server (asserted above from the table taken
    # after it); at most the UDP twin may already go, when its flows expired on a slow machine.
    assert nat["drain_resync_while_open"]["changes"] <= 1
    assert nat["drain_tcp_deleted_after"] is not None and nat["drain_tcp_deleted_after"] < 20
    assert nat["drain_udp_deleted_after"] is not None
    for service in (TCP_SERVICE, UDP_SERVICE):
        assert set(nat["table_drained"][service]["servers"]) == {BE1}
    assert nat["drain_next_resync_after"] is None


def test_nat_vip_reaches_the_listeners_and_not_the_nodes_own_ports(nat: dict[str, Any]) -> None:
    """The VIP guard (issue #18) ahead of IPVS: IPVS still balances the listeners (spread above), and a
    service the LB node runs on its wildcard address answers on the node's address, not on the VIP."""
    assert nat["guard_node_address"] == "node"
    assert nat["guard_vip"] == "refused"
    assert "layerlb_guard_guest_web" in nat["guard_tables"], nat["guard_tables"]


def test_nat_listener_removed(nat: dict[str, Any]) -> None:
    """A listener gone from the Plan drains like a backend: weight 0 first, the service deleted once no
    flow is left."""
    assert nat["listener_removed_sync"]["changes"] == 2  # the service's weight, and the VIP guard's ports
    assert nat["table_listener_draining"][UDP_SERVICE]["servers"][BE1]["weight"] == 0
    assert nat["listener_deleted_after"] is not None
    assert set(nat["table_listener_removed"]) == {TCP_SERVICE}


def test_nat_drain_ends_by_timeout_and_affinity_moves(nat: dict[str, Any]) -> None:
    """ClientIP affinity: persistence and Maglev (mh) as rendered; a drained server's clients go
    elsewhere at once (expire_quiescent_template), and it is deleted at the drain timeout even though a
    connection is still open."""
    assert nat["sticky_kernel_lines"] == nat["sticky_render_lines"]  # the render's lines, flags included
    service = nat["sticky_table"][f"TCP {scenarios.NAT_VIP2}:{PORT}"]
    assert (service["scheduler"], service["flags"], service["persistence"]) == ("mh", "mh-fallback", 600)
    assert nat["expire_quiescent_template"] == "1"
    assert len(nat["sticky_spread"]) == 1  # persistence: one client, one backend
    chosen = next(iter(nat["sticky_spread"]))
    assert chosen not in nat["sticky_spread_draining"]
    assert nat["sticky_active_before_timeout"] >= 1
    assert nat["sticky_deleted_after"] is not None


def test_the_engine_reads_the_table_as_ipvsadm_lists_it(nat: dict[str, Any]) -> None:
    """The engine's own read (netlink service dump + /proc real servers) agrees with `ipvsadm -Ln`, for
    plain services and for persistence with a scheduler flag."""
    assert nat["engine_view_first"] == nat["table_first"]
    assert nat["engine_view_sticky"] == nat["sticky_table"]


def test_the_settings_check_restores_a_scheduler_flag_removed_by_hand(nat: dict[str, Any]) -> None:
    """/proc does not show scheduler flags, so the fingerprint cannot see this edit; the netlink settings
    check does, and the sync puts the flag back (once)."""
    assert nat["sticky_flag_edited"] is None
    assert nat["sticky_flag_sync"]["changes"] == 1
    assert nat["sticky_flag_restored"] == "mh-fallback"
    assert nat["sticky_flag_resync"]["changes"] == 0


def test_refused_changes_are_named_and_the_others_are_applied(nat: dict[str, Any]) -> None:
    refused = nat["refused"]
    scratch = f"{scenarios.SCRATCH_VIP}:80"
    assert refused["error"] == (
        f"IPVS refused 2 of 4 change(s): `-A -t {scratch} -s rr`: already exists; "
        f"`-d -t {scratch} -r 10.0.2.99:8080`: no such destination, or scheduler/persistence engine not found"
    )
    assert refused["table"] == {
        f"TCP {scratch}": {
            "scheduler": "rr",
            "flags": None,
            "persistence": None,
            "servers": {"10.0.2.11:8080": {"forward": "-m", "weight": 1, "active": 0, "inactive": 0}},
        }
    }


def test_an_ipv6_vip_is_programmed_read_and_removed(nat: dict[str, Any]) -> None:
    v6 = nat["ipv6"]
    assert v6["kernel_lines"] == v6["render_lines"]
    assert v6["engine_view"] == v6["table"]
    assert set(v6["table"]) == {"TCP [fd00:100::1]:443", "UDP [fd00:100::1]:53"}
    tcp = v6["table"]["TCP [fd00:100::1]:443"]
    assert (tcp["scheduler"], tcp["flags"], tcp["persistence"]) == ("sh", "sh-fallback", 600)
    assert tcp["servers"]["[fd00:2::12]:8080"]["weight"] == 3
    assert v6["resync"]["changes"] == 0
    assert v6["table_after_remove"] == {}


def test_nat_restart_adopts_without_disturbing(nat: dict[str, Any]) -> None:
    """A new engine instance over the same kernel state writes nothing, and an open connection goes on."""
    assert nat["restart_sync"]["changes"] == 0
    assert nat["kept_after"] == nat["kept_before"]


def test_nat_foreign_services_untouched_and_remove_cleans_up(nat: dict[str, Any]) -> None:
    assert len(nat["foreign_before"]) == 3
    assert nat["foreign_after_syncs"] == nat["foreign_before"]
    assert nat["foreign_after_remove"] == nat["foreign_before"]
    assert set(nat["table_after_remove"]) == {f"TCP {scenarios.FOREIGN_VIP}:8080"}  # fwmark is not listed
    assert nat["vips_on_lo_after_remove"] == []


def test_nftables_engine_in_the_guest_kernel(nat: dict[str, Any]) -> None:
    """Parity: the nftables engine forwards nat on Debian's kernel as well."""
    nft = nat["nftables"]
    assert nft["available"], nft.get("reason")
    assert nft["first_sync"]["changes"] > 0
    assert set(nft["spread"]) == {"nb1", "nb2"}
    assert nft["peers"] == [scenarios.NAT_CLIENT]
    assert nft["resync"]["changes"] == 0
    assert not any(word.startswith("layerlb_") for word in nft["tables_after_remove"])


# --- dsr and tunnel ------------------------------------------------------------------------------------


def check_direct_return(found: dict[str, Any], vip: str, client: str, method: str) -> None:
    """What dsr and tunnel share: render = kernel, VIP on the LB's interface, balanced, client address
    seen, replies bypassing the LB, idempotent, adoption, removal."""
    service = f"TCP {vip}:{scenarios.DIRECT_PORT}"
    assert found["kernel_lines"] == found["render_lines"]
    assert {s["forward"] for s in found["table"][service]["servers"].values()} == {method}
    assert found["vip_on_lb_eth0"] == [{"local": vip, "prefixlen": 32, "label": "eth0:llb"}]
    assert set(found["spread"]) == {"be1", "be2"}
    assert found["peers"] == [client]
    assert found["downloaded"] == scenarios.DOWNLOAD
    # The reply (2 MB) reached the client without crossing the LB: the LB received only the client's
    # acknowledgements, and IPVS counted no packet out.
    assert found["client_rx_bytes_during_download"] >= scenarios.DOWNLOAD
    assert found["lb_rx_bytes_during_download"] < scenarios.DOWNLOAD / 10
    assert found["stats"][service]["in_packets"] > 0
    assert found["stats"][service]["out_packets"] == 0
    assert found["resync"]["changes"] == 0
    assert found["restart_sync"]["changes"] == 0
    assert found["table_after_remove"] == {}
    assert found["vip_on_lb_eth0_after_remove"] == []


def test_dsr(dsr: dict[str, Any]) -> None:
    """Direct routing on one L2 segment: the client reaches the VIP at the LB's MAC, the backends
    (VIP on lo, arp_ignore=1, arp_announce=2) answer it directly."""
    check_direct_return(dsr, scenarios.DSR_VIP, scenarios.DSR_CLIENT, "-g")
    assert dsr["client_vip_mac"] == dsr["lb_mac"]
    # The VIP guard (issue #18), with the VIP on the LB's eth0: the LB node's own service on its wildcard
    # address answers on the node's address, and not on the VIP.
    assert (dsr["guard_node_address"], dsr["guard_vip"]) == ("node", "refused")


def test_tunnel(tunnel: dict[str, Any]) -> None:
    """IP-in-IP to backends on another network: they decapsulate on tunl0 and answer the client directly."""
    check_direct_return(tunnel, scenarios.TUNNEL_VIP, scenarios.TUNNEL_CLIENT, "-i")
    assert all(count > 0 for count in tunnel["tunl0_rx_packets"].values())


# --- bench ---------------------------------------------------------------------------------------------


def test_bench_sync_of_1000_services(bench: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's figure, measured in the guest (not a timed assertion): a sync of 1,000 services x 10
    real servers, and a no-op re-sync. Printed with the emulation factor against this host."""
    assert bench["kernel_services"] == scenarios.BENCH_SERVICES
    assert bench["kernel_servers"] == scenarios.BENCH_SERVICES * scenarios.BENCH_SERVERS
    noops = bench["noop_syncs"] + bench["restart_syncs"] + bench["full_noop_syncs"]
    assert all(sync["changes"] == 0 for sync in noops)
    # every service and real server, plus the VIP guard, the VIP address and ip_forward
    assert bench["first_sync"]["changes"] == scenarios.BENCH_SERVICES * (1 + scenarios.BENCH_SERVERS) + 3
    assert bench["health_change_sync"]["changes"] == scenarios.BENCH_SERVICES
    started = time.perf_counter()
    host_probe = scenarios._emulation_probe()
    host_probe = min(host_probe, time.perf_counter() - started)
    guest_probe = min(bench["emulation_probe_seconds"], bench["emulation_probe_seconds_after"])
    factor = guest_probe / host_probe
    host_nftables = scenarios.nftables_bench(f"llb-nftbench-{os.getpid()}")
    assert bench["nftables"]["noop_changes"] == host_nftables["noop_changes"] == [0, 0, 0]
    kernel_factor = bench["nftables"]["first_seconds"] / host_nftables["first_seconds"]

    low, high = sorted((factor, kernel_factor))

    def figure(key: str) -> str:
        """Guest seconds, and the native estimate (divided by either emulation factor), in ms."""
        seconds = float(bench[key] if key.endswith("seconds") else bench[key]["seconds"])
        return (
            f"{seconds * 1000:.0f} ms (native est. {seconds / high * 1000:.1f}-{seconds / low * 1000:.1f} ms)"
        )

    lines = [
        "IPVS engine bench (inside the QEMU/TCG guest; native estimates divide by two emulation factors, "
        f"{factor:.1f}x for a pure Python loop and {kernel_factor:.1f}x for an nftables sync of the same "
        f"Plan: {bench['nftables']['first_seconds'] * 1000:.0f} ms in the guest, "
        f"{host_nftables['first_seconds'] * 1000:.0f} ms here):",
        f"  first sync of {scenarios.BENCH_SERVICES} services x {scenarios.BENCH_SERVERS} servers "
        f"({bench['first_sync']['changes']} changes): {figure('first_sync')}",
        f"  no-op re-sync, fast path (/proc fingerprint): median {figure('noop_median_seconds')}",
        f"  no-op re-sync with the settings check (fingerprint + netlink service dump, every "
        f"{engine.DEFAULT_FULL_CHECK_SECONDS:.0f} s): median {figure('full_noop_median_seconds')}",
        f"  no-op sync of a restarted engine (desired state, full read, compare): median "
        f"{figure('restart_median_seconds')}",
        f"    parts: netlink read {figure('read_netlink_seconds')}, of it /proc parse {figure('read_proc_seconds')}; "
        f"desired state {figure('desired_seconds')}; `ipvsadm -Ln` for comparison {figure('read_ipvsadm_seconds')}",
        f"  health change (1,000 weights): {figure('health_change_sync')}",
        f"  guest boot to command {bench['boot_seconds']:.1f} s, whole boot {bench['wall_seconds']:.1f} s",
    ]
    report = "\n".join(lines)
    (Path(ROOT) / ".cache" / "guest" / "ipvs-bench.txt").write_text(report + "\n")
    with capsys.disabled():
        print("\n" + report)


# --- the parsers, on output captured from the guest (no boot: IPv6 and flags the scenarios do not use) ----

LISTING = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  1.2.3.4:80 mh (mh-fallback,mh-port) persistent 600
  -> 10.0.0.1:80                  Masq    1      0          0
  -> 10.0.0.2:80                  Tunnel  0      3          7
TCP  1.2.3.6:80 wlc persistent 60 mask 255.255.255.0
UDP  1.2.3.4:53 sh (sh-fallback) ops
TCP  [2001:db8::1]:443 rr persistent 30
  -> [2001:db8::5]:443            Route   3      0          0
FWM  5 rr
  -> 10.0.0.9:0                   Route   1      0          0
"""

PROC = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
UDP  01020304:0035 sh ops
TCP  [2001:0db8:0000:0000:0000:0000:0000:0001]:01BB rr persistent 7500 80000000
  -> [2001:0db8:0000:0000:0000:0000:0000:0005]:01BB      Route   3      4          9
TCP  01020304:0050 mh  persistent 150000 FFFFFFFF
  -> 0A000002:0050      Tunnel  0      0          0
FWM  00000005 rr
"""


def test_parse_listing() -> None:
    """`ipvsadm -Ln --exact`: flags, persistence, extra settings, IPv6; fwmark services are skipped."""
    services = scenarios.parse_listing(LISTING)
    assert set(services) == {
        table.ServiceKey("TCP", "1.2.3.4", 80),
        table.ServiceKey("TCP", "1.2.3.6", 80),
        table.ServiceKey("UDP", "1.2.3.4", 53),
        table.ServiceKey("TCP", "2001:db8::1", 443),
    }
    mh = services[table.ServiceKey("TCP", "1.2.3.4", 80)]
    assert mh.settings == ("mh", "mh-fallback,mh-port", 600, ())
    tunnel = mh.servers[("10.0.0.2", 80)]
    assert (tunnel.forward, tunnel.weight, tunnel.active, tunnel.inactive) == ("-i", 0, 3, 7)
    assert services[table.ServiceKey("TCP", "1.2.3.6", 80)].extra == ("mask", "255.255.255.0")
    assert services[table.ServiceKey("UDP", "1.2.3.4", 53)].settings == ("sh", "sh-fallback", None, ("ops",))
    v6 = services[table.ServiceKey("TCP", "2001:db8::1", 443)]
    assert v6.key.option == "-t [2001:db8::1]:443"
    assert v6.servers[("2001:db8::5", 443)].option() == "-r [2001:db8::5]:443 -g -w 3"


def test_proc_fingerprint_ignores_counts_and_other_vips() -> None:
    v6 = proc.fingerprint(PROC, "2001:db8::1")
    assert v6 == (
        "TCP  [2001:0db8:0000:0000:0000:0000:0000:0001]:01BB rr persistent 7500 80000000",
        "  -> [2001:0db8:0000:0000:0000:0000:0000:0005]:01BB      Route   3",
    )
    assert proc.fingerprint(PROC.replace("3      4          9", "3      0          1"), "2001:db8::1") == v6
    assert len(proc.fingerprint(PROC, "1.2.3.4")) == 3  # UDP :53, TCP :80 and its server


def test_parse_connections() -> None:
    """/proc/net/ip_vs_conn: connections that are over (TIME_WAIT, CLOSE) and templates do not count."""
    table = """Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData
TCP 0A000102 C350 0A006401 0050 0A00020C 1F90 ESTABLISHED    899
TCP 0A000102 C351 0A006401 0050 0A00020B 1F90 TIME_WAIT      100
TCP 0A000102 0000 0A006401 0050 0A00020B 1F90 NONE           500
UDP 0A000102 D000 0A006401 14E9 0A00020B 1F90 UDP            290
"""
    assert proc.live_connections(table) == {
        ("TCP", "10.0.100.1", 80, "10.0.2.12", 8080),
        ("UDP", "10.0.100.1", 5353, "10.0.2.11", 8080),
    }

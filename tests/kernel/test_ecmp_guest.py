"""Flows survive ECMP changes on the IPVS engine, measured in the QEMU guest (Debian's kernel has IPVS and
IPIP; this machine's has neither): `guest_ecmp` runs 100 long-lived connections through a multipath router
over IPVS nodes while a 4th node joins and one leaves, for dsr, tunnel, a negative control and nat."""

from __future__ import annotations

from typing import Any

import pytest

from e2e.guest.guest import guest_findings
from tests.kernel import ecmp_lab as lab

BOOT_TIMEOUT = 900.0


@pytest.fixture(scope="module")
def ecmp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The findings of one guest boot running `guest_ecmp`."""
    return guest_findings(
        "tests.kernel.guest_ecmp", share=tmp_path_factory.mktemp("guest-ecmp"), timeout=BOOT_TIMEOUT
    )


RUNS = {
    "dsr": "ipvs dsr",
    "tunnel": "ipvs tunnel",
    "nat": "ipvs nat",
    "dsr_n4_rr": "ipvs dsr, n4 rr",
    "dsr_n4_not_sloppy": "ipvs dsr, n4 not sloppy",
}


def figures(ecmp: dict[str, Any]) -> str:
    return lab.table({label: ecmp[key] for key, label in RUNS.items()})


@pytest.mark.parametrize("architecture", ["dsr", "tunnel"])
def test_ipvs_flows_moved_by_ecmp_keep_their_backend(
    ecmp: dict[str, Any], architecture: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """≤ 1 % of 100 connections reset or answered by another backend when a node joins and when one leaves
    (the router moved flows each time); every node, n4 whose backend set grew included, holds the real
    servers in one order, and sloppy_tcp/sloppy_sctp are on."""
    found = ecmp[architecture]
    with capsys.disabled():
        print(f"\n{figures(ecmp)}")
    assert found["broken_before"] == 0
    for phase, numbers in found["phases"].items():
        assert numbers["moved_by_router"] >= 10, (phase, numbers)
        assert numbers["disturbed_percent"] <= 1.0, (phase, numbers)
    assert len({tuple(servers) for servers in found["tables"].values()}) == 1, found["tables"]
    assert found["n4_resync"] == 0
    assert set(found["schedulers"].values()) == {"mh (mh-fallback,mh-port)"}
    assert found["sysctls"] == {"sloppy_tcp": "1", "sloppy_sctp": "1"}


@pytest.mark.parametrize("control", ["dsr_n4_rr", "dsr_n4_not_sloppy"])
def test_a_joining_node_without_maglev_or_sloppy_breaks_the_flows_moved_to_it(
    ecmp: dict[str, Any], control: str
) -> None:
    """The negative controls, on the joining node n4 only: scheduled round-robin (as dsr was before), a
    moved flow reaches any backend, which resets it; without sloppy_tcp its packets are dropped."""
    assert ecmp[control]["phases"]["node added"]["disturbed_percent"] >= 5.0


def test_ipvs_nat_flows_moved_by_ecmp_break(ecmp: dict[str, Any]) -> None:
    """nat: a moved flow reaches a node that masquerades it with its own address; the backend resets it,
    though Maglev and sloppy_tcp picked the same backend. Flows the router did not move are unharmed."""
    found = ecmp["nat"]
    assert found["broken_before"] == 0
    assert found["phases"]["node added"]["broken"] > 0
    assert all(numbers["broken_unmoved"] == 0 for numbers in found["phases"].values())

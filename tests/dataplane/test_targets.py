"""A target's port and usability: what every proxy and balancer asks of it (sans-IO)."""

from __future__ import annotations

from layerlb_dataplane.core.targets import Target


def test_a_target_without_a_port_takes_the_port_the_client_connected_to() -> None:
    assert Target("app", "10.0.0.7", None, 1).port_for(8443) == 8443
    assert Target("app", "10.0.0.7", 9000, 1).port_for(8443) == 9000


def test_a_target_is_usable_while_in_the_plan_weighted_and_healthy() -> None:
    target = Target("app", "10.0.0.7", 80, 1)
    assert target.usable
    target.draining = True
    assert not target.usable
    target.draining = False
    target.weight = 0
    assert not target.usable
    target.weight = 3
    assert target.usable
    for _ in range(target.health.passive_threshold):  # ejected by passive failures
        target.health.record_passive(False)
    assert not target.usable

"""Of several operator replicas exactly one holds the Lease; a released or expired Lease passes to a standby."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from layerlb_operator import apiserver, lease

from tests.clock import Clock


class LeaseServer(apiserver.Client):
    """One Lease in memory with the API server's optimistic concurrency (resourceVersion, 409)."""

    def __init__(self, shared: dict[str, Any]) -> None:
        super().__init__(api_client=None)
        self.shared = shared

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        stored = self.shared.get("lease")
        if method == "GET":
            if stored is None:
                raise apiserver.ApiError(404, "not found")
            return copy.deepcopy(stored)
        body = copy.deepcopy(kwargs["body"])
        if method == "POST":
            if stored is not None:
                raise apiserver.ApiError(409, "exists")
        elif body["metadata"].get("resourceVersion") != stored["metadata"]["resourceVersion"]:  # type: ignore[index]
            raise apiserver.ApiError(409, "conflict")
        self.shared["version"] = self.shared.get("version", 0) + 1
        body["metadata"]["resourceVersion"] = str(self.shared["version"])
        self.shared["lease"] = body
        return copy.deepcopy(body)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _electors(count: int, clock: Clock) -> tuple[list[lease.Elector], dict[str, Any]]:
    shared: dict[str, Any] = {}
    electors = [
        lease.Elector(LeaseServer(shared), "ops", "leader", f"replica-{i}", clock=clock) for i in range(count)
    ]
    return electors, shared


def test_only_one_replica_holds_the_lease(clock: Clock) -> None:
    (first, second), shared = _electors(2, clock)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert first.try_acquire()  # renewing
    assert shared["lease"]["spec"]["holderIdentity"] == "replica-0"
    assert second.client.writes == {}  # a standby only reads


def test_a_released_lease_passes_at_once(clock: Clock) -> None:
    (first, second), shared = _electors(2, clock)
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    assert shared["lease"]["spec"]["holderIdentity"] == "replica-1"
    assert shared["lease"]["spec"]["leaseTransitions"] == 1


def test_an_expired_lease_passes_only_after_the_standby_saw_it_unrenewed_for_its_duration(
    clock: Clock,
) -> None:
    (first, second), _ = _electors(2, clock)
    assert first.try_acquire()
    assert not second.try_acquire()
    clock.now += 14
    assert not second.try_acquire()
    clock.now += 2
    assert second.try_acquire()
    assert not first.try_acquire()  # the old leader sees the new holder and stands by


def test_a_renewal_keeps_the_lease_from_expiring(clock: Clock) -> None:
    (first, second), _ = _electors(2, clock)
    assert first.try_acquire()
    assert not second.try_acquire()
    for _ in range(5):
        clock.now += 10
        assert first.try_acquire()
        assert not second.try_acquire()


def test_two_replicas_racing_for_a_free_lease_cannot_both_win(clock: Clock) -> None:
    (first, second), shared = _electors(2, clock)
    assert first.try_acquire()
    first.release()
    results: list[bool] = []
    server = first.client
    assert isinstance(server, LeaseServer)
    original = server.request

    def interleaved(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if method == "PUT" and not results:
            results.append(second.try_acquire())  # `second` writes between `first`'s read and write
        return original(method, path, **kwargs)

    server.request = interleaved  # type: ignore[method-assign]
    assert not first.try_acquire()
    assert results == [True]
    assert shared["lease"]["spec"]["holderIdentity"] == "replica-1"


def test_a_restarted_container_takes_its_pods_lease_at_once_but_never_another_pods(clock: Clock) -> None:
    """A leader that lost its Lease (an API server outage) exits; its restarted container must not wait out
    the Lease its own pod's earlier container still holds, or the LoadBalancers go unattended for its
    duration after the API server returns. Another pod's holder, or a process off a pod, still waits."""
    shared: dict[str, Any] = {}

    def elector(identity: str, pod: str | None) -> lease.Elector:
        return lease.Elector(LeaseServer(shared), "ops", "leader", identity, clock=clock, pod=pod)

    assert elector("layerlb-7d9-abcde-1-a1b2c3", "layerlb-7d9-abcde").try_acquire()
    assert not elector("layerlb-7d9-fghij-1-d4e5f6", "layerlb-7d9-fghij").try_acquire()  # another pod
    assert not elector("layerlb-7d9-abcde-7-0a0b0c", None).try_acquire()  # no pod: a hostname only
    assert not elector("layerlb-7d9-abc-1-0d0e0f", "layerlb-7d9-abc").try_acquire()  # a prefix is not a pod
    restarted = elector("layerlb-7d9-abcde-1-f7f8f9", "layerlb-7d9-abcde")  # same pod, pid 1 again
    assert restarted.try_acquire()
    assert shared["lease"]["spec"]["holderIdentity"] == "layerlb-7d9-abcde-1-f7f8f9"


def test_a_leader_frozen_past_its_lease_writes_nothing_when_it_wakes(clock: Clock) -> None:
    """A leader paused (SIGSTOP, a stalled node) until a standby took over wakes with queued work: no write
    may leave it, though its renewal loop has not yet noticed the loss. Only the Lease is written to."""
    (first, second), shared = _electors(2, clock)
    first.client.may_write = first.leading
    assert first.try_acquire() and first.leading()
    assert not second.try_acquire()
    clock.now += 9  # renewals late but within renew_deadline: still acting
    assert first.leading()
    clock.now += 7  # frozen: the standby saw no renewal for the Lease's duration
    assert second.try_acquire()
    assert not first.leading()
    with pytest.raises(apiserver.ApiError, match="not current") as refused:
        first.client.write("ConfigMap", "PATCH", "/api/v1/namespaces/ops/configmaps/x-plan", body={})
    assert refused.value.status == 0 and first.client.writes["ConfigMap"] == 0
    assert not first.try_acquire()  # it reads the Lease, sees the new holder, and stands by
    assert shared["lease"]["spec"]["holderIdentity"] == "replica-1"


def test_an_api_server_outage_pauses_the_leaders_writes_and_its_return_resumes_them(clock: Clock) -> None:
    """No answer says nothing about the holder: the leader stays up through an outage, its writes kept back
    once renewal is overdue, and renews and writes again once the API server answers (exiting instead cost
    a restart and a cold start after every outage). An answer naming another holder ends its leadership."""
    shared: dict[str, Any] = {}
    server = LeaseServer(shared)
    elector = lease.Elector(server, "ops", "leader", "replica-0", clock=clock, retry=0)
    server.may_write = elector.leading
    assert elector.try_acquire()
    answered = server.request
    seen: list[tuple[int, bool]] = []  # (attempt, leading) at each renewal attempt

    def outage_then_a_takeover(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        clock.now += 2
        attempt = len(seen) + 1
        seen.append((attempt, elector.leading()))
        if attempt <= 10:  # 20 s without an answer
            raise apiserver.ApiError(0, "MaxRetryError: connection refused")
        if attempt == 13 and method == "GET":  # another replica took the Lease meanwhile
            shared["lease"]["spec"].update(holderIdentity="replica-1", renewTime="later")
        return answered(method, path, **kwargs)

    server.request = outage_then_a_takeover  # type: ignore[method-assign]
    asyncio.run(asyncio.wait_for(elector.hold(), timeout=10))
    during, after = [leading for _, leading in seen[:10]], [leading for _, leading in seen[10:]]
    assert during[0] and not during[-1], seen  # writes kept back once renewal was 10 s overdue
    assert after[-1], seen  # the renewal after the outage: writing again, until the takeover shows
    with pytest.raises(apiserver.ApiError, match="not current"):
        server.write("ConfigMap", "PATCH", "/api/v1/namespaces/ops/configmaps/x-plan", body={})
    assert shared["lease"]["spec"]["holderIdentity"] == "replica-1"

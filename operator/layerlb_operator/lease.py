"""Leader election on a `coordination.k8s.io` Lease, so that of several operator replicas exactly one acts.

Why a Lease and not kopf's peering: kopf pauses *every* operator when two of the same priority meet
(replicas of one Deployment all have the same priority), it needs two extra CRDs, and it would not
cover the operator's own debounced queue, which runs outside kopf's handlers. A Lease is what
kube-controller-manager itself uses: the standbys wait, watching nothing and writing nothing; the
leader renews every `retry` seconds and, once it cannot renew for `renew_deadline`, stops acting: it writes
nothing more (`leading`, checked at every write), and it exits once an answer shows another holder.

Expiry is judged by this process's monotonic clock from the moment it last saw the Lease change (as
client-go does), so clocks that disagree between nodes cannot make two leaders.

One exception to waiting out the duration: a holder that was an earlier container of this same pod (the
identity's pod part, from the downward API's `POD_NAME`, is ours). The kubelet starts a pod's container only
once the previous one has exited, so that holder can no longer act; waiting would only leave the
LoadBalancers unattended. This is the common way a leader goes: it cannot renew through an API server
outage, steps down by exiting, and its restarted container finds the API server back and its own old Lease.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from layerlb_operator import apiserver

log = logging.getLogger("layerlb.operator")


def _micro_time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Elector:
    """Acquire, renew and release one Lease as `identity`."""

    client: apiserver.Client
    namespace: str
    name: str
    identity: str
    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0
    clock: Callable[[], float] = time.monotonic
    # This process's pod (`POD_NAME`): holders `POD-PID-SUFFIX` of it were earlier containers (see above).
    # None off a pod: processes sharing a hostname are not one pod's containers one after another.
    pod: str | None = None
    _seen: tuple[str, str] | None = field(default=None, init=False)  # (holder, renewTime) last observed
    _seen_at: float = field(default=0.0, init=False)
    _renewed_at: float = field(default=float("-inf"), init=False)  # when the last successful attempt began

    @property
    def path(self) -> str:
        """The Lease's URL path."""
        return apiserver.collection_path("coordination.k8s.io/v1", "Lease", self.namespace) + f"/{self.name}"

    def _spec(self, transitions: int, acquired: str | None = None) -> dict[str, Any]:
        now = _micro_time(datetime.datetime.now(datetime.UTC))
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.duration),
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True when this process holds it afterwards."""
        began = self.clock()
        try:
            lease = self.client.request("GET", self.path)
        except apiserver.ApiError as error:
            if error.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(0),
            }
            self.client.write(
                "Lease",
                "POST",
                apiserver.collection_path("coordination.k8s.io/v1", "Lease", self.namespace),
                body=body,
            )
            self._renewed_at = began
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        observed = (holder, str(spec.get("renewTime") or ""))
        if observed != self._seen:
            self._seen, self._seen_at = observed, self.clock()
        duration = float(spec.get("leaseDurationSeconds") or self.duration)
        if (
            holder
            and holder != self.identity
            and not self._earlier_container(holder)
            and self.clock() - self._seen_at < duration
        ):
            self._renewed_at = float("-inf")  # another replica leads: nothing more from this one
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            new_spec = self._spec(transitions, spec.get("acquireTime"))
        else:
            new_spec = self._spec(transitions + 1)
        lease["spec"] = new_spec
        # PUT with the resourceVersion we read: if another replica wrote in between, this one fails (409).
        try:
            self.client.write("Lease", "PUT", self.path, body=lease)
        except apiserver.ApiError as error:
            if error.status == 409:
                self._renewed_at = float("-inf")  # another replica wrote the Lease in between
                return False
            raise
        self._renewed_at = began
        return True

    def leading(self) -> bool:
        """Whether this process may still act as the leader: its last successful take or renewal began less
        than `renew_deadline` ago. A standby takes over only once `duration` (longer) has passed since it saw
        that renewal, which it cannot have seen before the renewal began, so while this holds no other
        replica leads. Judged at each write (`apiserver.Client.may_write`), not only by `hold`'s loop."""
        return self.clock() - self._renewed_at < self.renew_deadline

    def _earlier_container(self, holder: str) -> bool:
        """Whether `holder` (an identity `POD-PID-SUFFIX`, `main.identity`) was a container of this pod."""
        return self.pod is not None and holder.rsplit("-", 2)[0] == self.pod

    async def acquire(self) -> None:
        """Wait until this process holds the Lease."""
        announced = False
        while True:
            try:
                if await asyncio.to_thread(self.try_acquire):
                    log.info("leader: holding Lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return
                if not announced:
                    log.info(
                        "standby: Lease %s/%s is held by %s",
                        self.namespace,
                        self.name,
                        (self._seen or ("?",))[0],
                    )
                    announced = True
            except apiserver.ApiError as error:
                log.warning("leader election: %s", error)
            await asyncio.sleep(self.retry)

    async def hold(self) -> None:
        """Renew the Lease every `retry` seconds; return (leadership lost) once an answer shows another holder,
        or renewal was refused for `renew_deadline` seconds.

        An API server that does not answer (down, or its etcd down: 5xx) says nothing about the holder, so
        through such an outage the process stays up and keeps trying: `leading` keeps its writes back once
        renewal is `renew_deadline` overdue, and the first renewal after the outage (the Lease still names
        this process unless a standby reached the API server meanwhile and took it, which the answer shows)
        resumes them. Exiting instead would cost a container restart and a cold start after every outage."""
        last = self.clock()
        paused = False
        while True:
            await asyncio.sleep(self.retry)
            try:
                if await asyncio.to_thread(self.try_acquire):
                    last = self.clock()
                    if paused:
                        log.info(
                            "leader election: Lease %s/%s renewed, writing again", self.namespace, self.name
                        )
                        paused = False
                    continue
                if self._seen is not None and self._seen[0] != self.identity:
                    log.error(
                        "leader election: Lease %s/%s is now %s's", self.namespace, self.name, self._seen[0]
                    )
                    return
            except apiserver.ApiError as error:
                log.warning("leader election: renewal failed: %s", error)
                if error.status == 0 or error.status >= 500:
                    if not self.leading() and not paused:
                        log.warning(
                            "leader election: no answer for %.0f s; writes paused", self.renew_deadline
                        )
                        paused = True
                    continue
            if self.clock() - last > self.renew_deadline:
                log.error("leader election: lost Lease %s/%s", self.namespace, self.name)
                return

    def release(self) -> None:
        """Give the Lease up on a clean exit, so a standby takes over at once rather than after expiry."""
        try:
            lease = self.client.request("GET", self.path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity="", leaseDurationSeconds=1)
            lease["spec"] = spec
            self.client.write("Lease", "PUT", self.path, body=lease)
        except apiserver.ApiError as error:
            log.warning("leader election: could not release the Lease: %s", error)

"""Session affinity for the L7 proxy: a client keeps its target while that target is usable.

Applications that keep session state in memory break when a client's requests spread over endpoints.

- `Cookie`: the proxy sets an HttpOnly cookie whose value is an opaque token for the target, a keyed
  hash of the LoadBalancer, backend, address and port. The address is not revealed, and every worker
  and every replica computes the same token, so any of them honours a cookie another one set.
- `ClientIP`: a table client address → target per backend; an entry lives `timeout` seconds after its
  last use. On a miss the target is chosen by weighted rendezvous hashing of the client address over
  the usable targets, so that workers and replicas, which do not share tables, agree on it.

Sans-IO: the caller passes the clock.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection
from weakref import WeakKeyDictionary

from layerlb_dataplane.core.state import BackendPool
from layerlb_dataplane.core.targets import Target


def token(plan_key: str, target: Target) -> bytes:
    """The cookie value naming `target`: 16 hex digits, stable across workers, replicas and reloads."""
    text = f"{target.backend}\0{target.address}\0{target.port}".encode()
    return hashlib.blake2b(text, key=plan_key.encode()[:64], digest_size=8).hexdigest().encode()


def rendezvous(pool: BackendPool, client_ip: str, exclude: Collection[Target] = ()) -> Target | None:
    """The usable target with the highest weighted rendezvous score for `client_ip`."""
    best: Target | None = None
    best_score = -1.0
    seed = client_ip.encode()
    for target in pool.targets:
        if not target.usable or target in exclude:
            continue
        digest = hashlib.blake2b(seed + f"\0{target.address}\0{target.port}".encode(), digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
        score = target.weight / -math.log(unit)
        if score > best_score:
            best, best_score = target, score
    return best


class Affinity:
    """One listener's affinity state: cookie tokens by pool, and the ClientIP table."""

    def __init__(self) -> None:
        self._tokens: WeakKeyDictionary[BackendPool, tuple[str, dict[bytes, Target]]] = WeakKeyDictionary()
        self._cookies: WeakKeyDictionary[Target, tuple[str, bytes]] = WeakKeyDictionary()
        self.clients: dict[tuple[str, str], tuple[Target, float]] = {}

    def by_cookie(self, plan_key: str, pool: BackendPool, value: bytes) -> Target | None:
        """The usable target a cookie value names in `pool`, or None (unknown, stale or unusable)."""
        cached = self._tokens.get(pool)
        if cached is None or cached[0] != plan_key:
            cached = (plan_key, {token(plan_key, target): target for target in pool.targets})
            self._tokens[pool] = cached
        target = cached[1].get(value)
        return target if target is not None and target.usable else None

    def cookie_token(self, plan_key: str, target: Target) -> bytes:
        """`token(plan_key, target)`, cached."""
        cached = self._cookies.get(target)
        if cached is None or cached[0] != plan_key:
            cached = (plan_key, token(plan_key, target))
            self._cookies[target] = cached
        return cached[1]

    def by_client(
        self, pool: BackendPool, client_ip: str, now: float, timeout: float, exclude: Collection[Target] = ()
    ) -> Target | None:
        """The client's target in `pool`: the remembered one while usable and not excluded, else a new one.

        Either way the entry is renewed for `timeout`, so a retry that moved the client (`exclude`) pins it
        to the target that took it.
        """
        key = (pool.name, client_ip)
        entry = self.clients.get(key)
        if entry is not None and entry[1] > now and entry[0].usable and entry[0] not in exclude:
            target = entry[0]
        else:
            found = rendezvous(pool, client_ip, exclude)
            if found is None:
                return None
            target = found
        self.clients[key] = (target, now + timeout)
        return target

    def expire(self, now: float) -> None:
        """Forget ClientIP entries past their timeout."""
        stale = [key for key, (_, until) in self.clients.items() if until <= now]
        for key in stale:
            del self.clients[key]

"""What the hashing balancers hash, seen from real traffic: the endpoint's identity includes its port, and
`hashOn` Header/Cookie keys decide the target, whoever the client is.

Pods of one node, or several ports of one host, share an IP: an identity without the port would put every
such endpoint on the same ring points and Maglev slots, so one of them would take all keys. A `hashOn`
key that is ignored would fall back to the client address, so all keys of one client would land on one
target and one key would move with the client. Both showed as a passing suite when planted (issue #18), as
the older test spied on `pick` with one backend; these count which of three backends answers.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from layerlb_dataplane.core import balancing
from layerlb_dataplane.core.targets import Target

from layerlb.api import Algorithm
from tests.dataplane.conftest import TIMEOUT, Backend, ProxyUnderTest, RawClient, get, lb_document

Backends = Callable[..., Backend]
Proxies = Callable[[dict[str, Any]], ProxyUnderTest]

HASHING = [Algorithm.source_hash, Algorithm.ring_hash, Algorithm.maglev]
KEYS = 30  # distinct keys over three targets: each target gets some unless the hash ignores the key


class ClientFrom(RawClient):
    """A raw client whose connection leaves from `source` (a 127.0.0.0/8 address): another client IP."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
        self.buffer = b""


def three_on_one_host(backends: Backends) -> tuple[list[Backend], list[tuple[str, int]]]:
    made = [backends(name) for name in "abc"]
    return made, [("127.0.0.1", backend.port) for backend in made]


def served_by(client: RawClient, request: bytes) -> str:
    client.send(request)
    response = client.response()
    assert response.status == 200, response
    return response.body.decode().removeprefix("ok ")


# --- the endpoint's identity ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", HASHING)
def test_endpoints_sharing_an_ip_each_get_a_share_of_keys(algorithm: Algorithm) -> None:
    """Three endpoints on one address, ports apart: each takes roughly a third of 3,000 keys."""
    targets = [Target("app", "10.0.0.7", port, 1) for port in (8080, 8081, 8082)]
    balancer = balancing.create(algorithm, targets)
    counts = Counter(balancer.pick(b"key-%d" % n) for n in range(3000))
    assert set(counts) == set(targets)
    assert all(600 <= count <= 1400 for count in counts.values()), counts


def test_the_target_name_tells_ports_apart() -> None:
    assert balancing.target_name(Target("app", "10.0.0.7", 80, 1)) != balancing.target_name(
        Target("app", "10.0.0.7", 81, 1)
    )


@pytest.mark.parametrize("algorithm", HASHING)
def test_header_keys_spread_over_endpoints_sharing_an_ip(
    algorithm: Algorithm, backends: Backends, proxies: Proxies
) -> None:
    """Over real sockets: 30 keys through the proxy reach all three backends of one host."""
    _, endpoints = three_on_one_host(backends)
    options = {"app": {"algorithm": algorithm.value, "hashOn": {"type": "Header", "name": "X-User"}}}
    proxy = proxies(lb_document({"app": endpoints}, backend_options=options))
    client = proxy.client()
    seen = Counter(served_by(client, get(extra=f"X-User: user-{n}\r\n")) for n in range(KEYS))
    assert set(seen) == {"a", "b", "c"}, seen


# --- hashOn: Header and Cookie --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "hash_on", "carry"),
    [
        (Algorithm.ring_hash, {"type": "Header", "name": "X-User"}, "X-User: {}"),
        (Algorithm.maglev, {"type": "Cookie", "name": "sid"}, "Cookie: theme=dark; sid={}"),
        (Algorithm.source_hash, {"type": "Header", "name": "X-User"}, "X-User: {}"),
    ],
)
def test_hash_on_keys_pick_the_target_whoever_the_client_is(
    algorithm: Algorithm, hash_on: dict[str, str], carry: str, backends: Backends, proxies: Proxies
) -> None:
    """One client spreads its keys over all three backends; each key sticks to its backend from any client
    address and over any connection."""
    _, endpoints = three_on_one_host(backends)
    options = {"app": {"algorithm": algorithm.value, "hashOn": hash_on}}
    proxy = proxies(lb_document({"app": endpoints}, backend_options=options))

    def request(key: str) -> bytes:
        return get(extra=carry.format(key) + "\r\n")

    first = ClientFrom(proxy.port, "127.0.0.2")
    home = {key: served_by(first, request(key)) for key in (f"user-{n}" for n in range(KEYS))}
    assert set(home.values()) == {"a", "b", "c"}, home  # one client address, all three backends
    for source in ("127.0.0.3", "127.0.0.4"):
        other = ClientFrom(proxy.port, source)
        moved = {key: target for key in home if (target := served_by(other, request(key))) != home[key]}
        assert moved == {}, f"from {source}, keys moved: {moved}"
        other.close()
    first.close()


def test_requests_without_the_hash_key_hash_the_client_address(backends: Backends, proxies: Proxies) -> None:
    """The fallback the API documents: no header, so the client address decides, the same every time."""
    _, endpoints = three_on_one_host(backends)
    options = {"app": {"algorithm": "ring-hash", "hashOn": {"type": "Header", "name": "X-User"}}}
    proxy = proxies(lb_document({"app": endpoints}, backend_options=options))
    by_source = {}
    for source in (f"127.0.0.{n}" for n in range(2, 14)):
        client = ClientFrom(proxy.port, source)
        answers = {served_by(client, get()) for _ in range(3)}
        client.close()
        assert len(answers) == 1, (source, answers)
        by_source[source] = answers.pop()
    assert len(set(by_source.values())) >= 2, by_source  # twelve addresses do not all share one backend


# --- session affinity over endpoints sharing an IP ---------------------------------------------------------


def test_client_ip_affinity_spreads_clients_over_endpoints_sharing_an_ip(
    backends: Backends, proxies: Proxies
) -> None:
    """Twelve client addresses reach all three backends of one host, each address keeping its backend."""
    _, endpoints = three_on_one_host(backends)
    document = lb_document({"app": endpoints}, sessionAffinity={"type": "ClientIP", "timeoutSeconds": 60})
    proxy = proxies(document)
    homes = {}
    for source in (f"127.0.0.{n}" for n in range(2, 14)):
        answers = set()
        for _ in range(2):
            client = ClientFrom(proxy.port, source)
            answers.add(served_by(client, get()))
            client.close()
        assert len(answers) == 1, (source, answers)
        homes[source] = answers.pop()
    assert set(homes.values()) == {"a", "b", "c"}, homes


def test_cookie_affinity_tells_endpoints_sharing_an_ip_apart(backends: Backends, proxies: Proxies) -> None:
    """Each backend's cookie brings its client back to that backend, not to a neighbour on the same host."""
    _, endpoints = three_on_one_host(backends)
    document = lb_document({"app": endpoints}, sessionAffinity={"type": "Cookie", "cookieName": "sticky"})
    proxy = proxies(document)
    cookies: dict[str, str] = {}
    client = proxy.client()
    for _ in range(30):  # new clients (no cookie) are balanced round-robin: all three are met
        client.send(get())
        response = client.response()
        name = response.body.decode().removeprefix("ok ")
        cookie = response.header("set-cookie")
        assert cookie is not None
        cookies.setdefault(name, cookie.split(";")[0])
        if len(cookies) == 3:
            break
    assert set(cookies) == {"a", "b", "c"}, cookies
    assert len(set(cookies.values())) == 3  # three endpoints, three tokens
    for name, cookie in cookies.items():
        for _ in range(3):
            assert served_by(client, get(extra=f"Cookie: {cookie}\r\n")) == name


# --- pinned choices --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "ports"),
    [
        (Algorithm.source_hash, "100011121120000111211011"),
        (Algorithm.ring_hash, "121110211220212202212111"),
        (Algorithm.maglev, "010121112202010011112121"),
    ],
)
def test_hashing_choices_are_pinned_so_replicas_of_two_versions_agree(
    algorithm: Algorithm, ports: str
) -> None:
    """During a rollout old and new replicas serve side by side: a key must reach the same endpoint from
    both, so the tables (hash inputs, ring points, Maglev permutations) may not drift between releases."""
    targets = [
        Target("app", "10.0.0.7", 8080 + offset, weight) for offset, weight in ((0, 1), (1, 2), (2, 1))
    ]
    balancer = balancing.create(algorithm, targets)
    picks = [balancer.pick(b"key-%d" % n) for n in range(24)]
    assert "".join(str(pick.port - 8080) if pick and pick.port else "-" for pick in picks) == ports


@pytest.mark.parametrize(("size", "prime"), [(3, True), (4, False), (9, False), (25, False), (65537, True)])
def test_a_maglev_table_size_must_be_prime(size: int, prime: bool) -> None:
    if prime:
        assert balancing.Maglev([], table_size=size).table_size == size
        return
    with pytest.raises(ValueError, match="must be a prime number"):
        balancing.Maglev([], table_size=size)


@pytest.mark.parametrize("algorithm", HASHING)
def test_a_mostly_dead_table_falls_back_to_the_usable_targets_by_hash(algorithm: Algorithm) -> None:
    """Past 64 dead slots a pick hashes over the usable targets instead of walking the table on."""
    targets = [Target("app", "10.0.0.7", 8000 + n, 1) for n in range(300)]
    balancer = balancing.create(algorithm, targets)
    alive = targets[:3]
    for target in targets[3:]:
        target.draining = True  # without update(): the tables still hold them
    picks = [balancer.pick(b"key-%d" % n) for n in range(300)]
    assert set(picks) == set(alive)
    assert picks == [balancer.pick(b"key-%d" % n) for n in range(300)]  # and the same every time

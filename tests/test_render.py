"""The renderers produce exactly the reviewed configurations, and the real tools accept them.

Golden files: every `testdata/in/NAME.yaml` renders to `testdata/out/NAME.FORMAT` for each format that
applies; a format that does not apply must say why instead (and have no golden). `pytest
--update-goldens` rewrites the goldens; without it a difference fails with a unified diff. Every
nftables render is checked by `nft -c` (the kernel validates the transaction, nothing is applied) in a
throwaway network namespace, and every haproxy render by `haproxy -c`.
"""

from __future__ import annotations

import difflib
import http.client
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerlb import api, cli, documents, plan
from layerlb.render import formats, haproxy_config, ipvs_rules, nftables_ruleset, shared

ROOT = Path(__file__).resolve().parent.parent
IN = ROOT / "testdata" / "in"
OUT = ROOT / "testdata" / "out"
CASES = sorted(IN.glob("*.yaml"))


def _plan(case: Path) -> plan.Plan:
    resolved, errors = documents.plans(documents.load([str(case)]))
    assert not errors, errors
    assert len(resolved) == 1, f"{case.name}: one LoadBalancer per golden input"
    return resolved[0][1]


PLANS = {case.stem: _plan(case) for case in CASES}


def _applies(fmt: str) -> list[str]:
    return [name for name, p in PLANS.items() if formats.unsupported(p, fmt) is None]


def _tool(name: str) -> str:
    """The path of a system tool the checks need; never a skip: `make setup` installs them."""
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in ("/usr/sbin", "/sbin") if (Path(d) / name).exists()), None
    )
    assert found, f"{name} is not installed; run scripts/system-packages.sh (make setup)"
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


# --- goldens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", formats.FORMATS)
@pytest.mark.parametrize("name", sorted(PLANS))
def test_golden(name: str, fmt: str, request: pytest.FixtureRequest) -> None:
    p = PLANS[name]
    golden = OUT / f"{name}.{fmt}"
    update = bool(request.config.getoption("--update-goldens"))
    reason = formats.unsupported(p, fmt)
    if reason is not None:
        assert reason.startswith("spec."), reason
        if update:
            golden.unlink(missing_ok=True)
        assert not golden.exists(), f"{golden.name} is stale: {reason}; run pytest --update-goldens"
        return
    actual = formats.render(p, fmt)
    if update:
        OUT.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
        return
    assert golden.exists(), f"{golden.name} is missing; run pytest --update-goldens"
    expected = golden.read_text(encoding="utf-8")
    if actual != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            f"testdata/out/{golden.name} (expected)",
            f"{golden.name} (rendered)",
        )
        pytest.fail(
            "render differs from the golden (pytest --update-goldens rewrites it):\n" + "".join(diff),
            pytrace=False,
        )


def test_every_golden_has_an_input_and_a_format() -> None:
    for golden in sorted(OUT.iterdir()):
        stem, _, fmt = golden.name.rpartition(".")
        assert stem in PLANS and fmt in formats.FORMATS, (
            f"{golden.name}: no testdata/in/{stem}.yaml or format"
        )


def test_the_goldens_cover_every_architecture_engine_and_protocol() -> None:
    seen = {(p.mode, p.architecture, p.engine) for p in PLANS.values()}
    for mode, architectures in api.ARCHITECTURES.items():
        for architecture in architectures:
            engines: list[api.Engine | None] = [
                e for e, a in api.ENGINE_ARCHITECTURES.items() if architecture in a
            ]
            for engine in engines or [None]:
                assert (mode, architecture, engine) in seen, (mode, architecture, engine)
    protocols = {listener.protocol for p in PLANS.values() for listener in p.listeners}
    assert protocols == set(api.Protocol)
    assert any(shared.is_ipv6(p.vip) for p in PLANS.values())


def test_the_cli_prints_the_golden(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["render", "--format", "ipvs", str(IN / "l4-nat-ipvs.yaml")]) == 0
    assert capsys.readouterr().out == (OUT / "l4-nat-ipvs.ipvs").read_text(encoding="utf-8")


def test_the_cli_refuses_a_format_that_does_not_apply(capsys: pytest.CaptureFixture[str]) -> None:
    case = IN / "l4-proxy-udp.yaml"
    assert cli.main(["render", "--format", "haproxy", str(case)]) == cli.EXIT_INVALID
    assert capsys.readouterr().err == (
        f"{case}: LoadBalancer/syslog: spec.listeners[0].protocol: format haproxy cannot proxy UDP "
        "(listener syslog); the layerlb data plane can\n"
    )


# --- the real tools ---------------------------------------------------------------------------------


def _nft_check(ruleset: str, tmp_path: Path) -> None:
    """`nft -c -f` in a fresh network namespace holding an `eth0`: checks with the kernel, changes nothing."""
    path = tmp_path / "ruleset.nft"
    path.write_text(ruleset, encoding="utf-8")
    unshare = [_tool("unshare"), "--net"] if os.geteuid() == 0 else [_tool("unshare"), "-r", "--net"]
    script = f"{_tool('ip')} link add eth0 type veth peer name eth1 && exec {_tool('nft')} -c -f {path}"
    result = _run([*unshare, "sh", "-c", script])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", _applies("nftables"))
def test_nft_accepts_the_nftables_render(name: str, tmp_path: Path) -> None:
    _nft_check(formats.render(PLANS[name], "nftables"), tmp_path)


@pytest.mark.parametrize("name", ["l4-nat-nftables-weighted", "l4-nat-nftables-ipv6", "l4-dsr-nftables"])
def test_nft_accepts_the_vip_guard_table(name: str, tmp_path: Path) -> None:
    """The IPVS engine's and transparent's guard (kernel/vip_guard.py), IPv4 and IPv6, TCP and UDP ports."""
    ruleset = nftables_ruleset.nft_guard_ruleset(PLANS[name], "layerlb sha256:" + "0" * 64)
    assert "hook input priority filter" in ruleset and ruleset.rstrip().endswith("reject\n\t}\n}")
    _nft_check(ruleset, tmp_path)


def test_nft_catches_an_invalid_ruleset(tmp_path: Path) -> None:
    broken = formats.render(PLANS["l4-nat-nftables-weighted"], "nftables").replace("4-5 :", "3-5 :")
    with pytest.raises(AssertionError, match="conflicting intervals"):
        _nft_check(broken, tmp_path)


def _haproxy_check(p: plan.Plan, tmp_path: Path) -> str:
    """`haproxy -c` on a render whose certificates exist in `tmp_path` (-c binds nothing)."""
    cert_dir = tmp_path / "certs"
    for file, pem in haproxy_config.haproxy_certificates(p, str(cert_dir)).items():
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        Path(file).write_text(pem, encoding="utf-8")
    config = tmp_path / "haproxy.cfg"
    config.write_text(formats.render(p, "haproxy", cert_dir=str(cert_dir)), encoding="utf-8")
    result = _run([_tool("haproxy"), "-c", "-f", str(config)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output, output
    return output


@pytest.mark.parametrize("name", _applies("haproxy"))
def test_haproxy_accepts_the_haproxy_render(name: str, tmp_path: Path) -> None:
    _haproxy_check(PLANS[name], tmp_path)


def test_haproxy_reads_both_certificates_of_an_https_listener(tmp_path: Path) -> None:
    p = PLANS["l7-https"]
    files = haproxy_config.haproxy_certificates(p, str(tmp_path / "certs"))
    assert sorted(Path(f).relative_to(tmp_path) for f in files) == [
        Path("certs/https/00-shop-tls.pem"),
        Path("certs/https/01-api-tls.pem"),
    ]
    assert all("BEGIN CERTIFICATE" in pem and "PRIVATE KEY" in pem for pem in files.values())
    _haproxy_check(p, tmp_path)
    assert f"ssl crt {tmp_path}/certs/https/" in formats.render(p, "haproxy", cert_dir=f"{tmp_path}/certs/")


class _Named(http.server.BaseHTTPRequestHandler):
    """Answers every request with the name of the backend it stands for."""

    def _answer(self) -> None:
        body = self.server.backend_name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("X-Backend", body.decode())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def routed_haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """HAProxy running the routes golden on loopback, every backend a server that answers its name.

    No default backend, so a request no route takes must get the 404 of the layerlb data plane.
    """
    p = PLANS["l7-proxy-routes"]
    servers = []
    backends = []
    for backend in p.backends:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Named)
        server.backend_name = backend.name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        endpoint = plan.Endpoint(address="127.0.0.1", port=server.server_address[1], weight=1)
        backends.append(
            backend.model_copy(
                update={"endpoints": (endpoint,), "health_check": None, "proxy_protocol": None}
            )
        )
    port = _free_port()
    listener = p.listeners[0].model_copy(update={"port": port})
    local = p.model_copy(
        update={
            "vip": "127.0.0.1",
            "listeners": (listener,),
            "backends": tuple(backends),
            "default_backend": None,
        }
    )
    config = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    config.write_text(formats.render(local, "haproxy"), encoding="utf-8")
    process = subprocess.Popen(
        [_tool("haproxy"), "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not start listening"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        for server in servers:
            server.shutdown()
            server.server_close()


CANARY = {"X-Canary": "true", "X-Team": 'it\'s "blue" $HOME'}


@pytest.mark.parametrize(
    ("method", "host", "path", "headers", "answer"),
    [
        ("GET", "api.example.com", "/v1/status", {}, "app"),
        ("GET", "API.example.com:80", "/v1/status", {}, "app"),
        ("GET", "api.example.com:8080", "/v1/x", CANARY, "canary"),
        ("HEAD", "api.example.com", "/v1", CANARY, "canary"),
        ("POST", "api.example.com", "/v1/x", CANARY, "api"),
        ("GET", "api.example.com", "/v1/x", {**CANARY, "X-Canary": "true, false"}, "api"),
        ("GET", "a.b.example.com:81", "/v1/y", {}, "api"),
        ("GET", "a.b.example.com", "/v10", {}, "404"),
        ("GET", "example.com", "/v1/y", {}, "404"),
        ("POST", "x", "/upload", {}, "static"),
        ("GET", "x", "/upload", {}, "404"),
        ("GET", "x", "/static", {}, "static"),
        ("GET", "x", "/static/a?q=1", {}, "static"),
        ("GET", "x", "/staticx", {}, "404"),
    ],
)
def test_haproxy_routes_requests_as_the_plan_says(
    routed_haproxy: int, method: str, host: str, path: str, headers: dict[str, str], answer: str
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", routed_haproxy, timeout=10)
    try:
        connection.request(method, path, headers={"Host": host, **headers})
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    if answer == "404":
        assert (response.status, body) == (404, "no route matches this request")
    else:
        assert (response.status, response.getheader("X-Backend")) == (200, answer)


# --- choices the renders make -----------------------------------------------------------------------


def test_weight_ranges_size_each_endpoint_by_weight_and_skip_weight_zero() -> None:
    assert nftables_ruleset.weight_ranges([3, 1, 0, 2]) == [(0, 2), (3, 3), None, (4, 5)]
    assert nftables_ruleset.weight_ranges([0, 0]) == [None, None]
    assert [nftables_ruleset.nft_range(0, 2), nftables_ruleset.nft_range(3, 3)] == ["0-2", "3"]


def _backend(algorithm: api.Algorithm, weights: tuple[int, ...] = (1, 1), **hash_on: str) -> plan.Backend:
    return plan.Backend(
        name="app",
        algorithm=algorithm,
        hash_on=plan.HashOn(**hash_on),
        endpoints=tuple(
            plan.Endpoint(address=f"10.0.0.{i + 1}", port=80, weight=w) for i, w in enumerate(weights)
        ),
    )


@pytest.mark.parametrize(
    ("algorithm", "weights", "scheduler"),
    [
        (api.Algorithm.round_robin, (2, 2, 0), "rr"),
        (api.Algorithm.round_robin, (2, 1), "wrr"),
        (api.Algorithm.least_connections, (1, 1), "wlc"),
        (api.Algorithm.random_two_choices, (1, 1), "wlc"),
        (api.Algorithm.source_hash, (1, 1), "sh"),
        (api.Algorithm.maglev, (1, 1), "mh"),
        (api.Algorithm.ring_hash, (1, 1), "mh"),
    ],
)
def test_ipvs_scheduler_follows_the_algorithm(
    algorithm: api.Algorithm, weights: tuple[int, ...], scheduler: str
) -> None:
    assert ipvs_rules.ipvs_scheduler(_backend(algorithm, weights)) == scheduler


def _l4_plan(
    architecture: api.Architecture, algorithm: api.Algorithm, affinity: api.AffinityType
) -> plan.Plan:
    return plan.Plan(
        name="web",
        namespace="shop",
        generation=1,
        mode=api.Mode.L4,
        architecture=architecture,
        engine=api.Engine.ipvs,
        vip="192.0.2.10",
        listeners=(plan.Listener(name="tcp", port=80, protocol=api.Protocol.TCP, transport="TCP"),),
        backends=(_backend(algorithm, (1, 2)),),
        default_backend="app",
        session_affinity=plan.SessionAffinity(type=affinity, timeout_seconds=600),
    )


@pytest.mark.parametrize("architecture", [api.Architecture.dsr, api.Architecture.tunnel])
@pytest.mark.parametrize(
    ("algorithm", "affinity", "flags"),
    [
        (api.Algorithm.round_robin, api.AffinityType.None_, "mh-fallback,mh-port"),
        (api.Algorithm.least_connections, api.AffinityType.None_, "mh-fallback,mh-port"),
        (api.Algorithm.random_two_choices, api.AffinityType.None_, "mh-fallback,mh-port"),
        (api.Algorithm.maglev, api.AffinityType.None_, "mh-fallback"),
        (api.Algorithm.ring_hash, api.AffinityType.None_, "mh-fallback"),
        (api.Algorithm.source_hash, api.AffinityType.None_, "mh-fallback"),
        (api.Algorithm.round_robin, api.AffinityType.ClientIP, "mh-fallback"),
    ],
)
def test_dsr_and_tunnel_schedule_every_flow_by_maglev_so_every_node_picks_the_same_backend(
    architecture: api.Architecture, algorithm: api.Algorithm, affinity: api.AffinityType, flags: str
) -> None:
    """mh-port hashes the client's port too (the flow); by client address alone for the hashing algorithms
    (their key is the client address) and ClientIP affinity. nat keeps the algorithm's own scheduler (its flows cannot change node anyway)."""
    p = _l4_plan(architecture, algorithm, affinity)
    assert ipvs_rules.ipvs_schedule(p, p.backends[0]) == ("mh", flags)
    (service,) = ipvs_rules.ipvs_services(p)
    assert (service.scheduler, service.flags) == ("mh", flags)
    nat = _l4_plan(api.Architecture.nat, algorithm, affinity)
    scheduler = ipvs_rules.ipvs_scheduler(nat.backends[0])
    assert ipvs_rules.ipvs_schedule(nat, nat.backends[0]) == (
        scheduler,
        ipvs_rules.IPVS_SCHEDULER_FLAGS.get(scheduler),
    )


def test_nftables_dsr_gives_every_node_the_same_flow_hash_whatever_order_the_endpoints_came_in(
    tmp_path: Path,
) -> None:
    """The map a flow is hashed through depends only on the LoadBalancer and its endpoint set: the seed
    is the LoadBalancer's, the endpoints are sorted, and the key is the flow (client address and port;
    the rule's match fixes protocol, VIP and port). Only the node's own MAC and device differ."""
    case = IN / "l4-dsr-nftables.yaml"
    text = case.read_text()
    first, second = "        - {address: 10.3.0.5, weight: 2}\n", "        - {address: 10.3.0.6}\n"
    assert first + second in text
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(text.replace(first + second, second + first))
    neighbours = {"10.3.0.5": "02:00:00:00:00:05", "10.3.0.6": "02:00:00:00:00:06"}

    def hashing(p: plan.Plan, device: str, mac: str) -> list[str]:
        ruleset = formats.render(p, "nftables", device=device, device_mac=mac, neighbours=neighbours)
        return [
            line.split("ether daddr set ")[1].split(" fwd to")[0]
            for line in ruleset.splitlines()
            if "jhash" in line
        ]

    node1 = hashing(PLANS["l4-dsr-nftables"], "eth0", "02:00:00:00:00:01")
    node2 = hashing(_plan(swapped), "ens3", "02:00:00:00:00:02")
    assert node1 == node2
    assert node1[0].startswith("jhash ip saddr . tcp sport mod 3 seed ")


@pytest.mark.parametrize(
    ("backend", "balance"),
    [
        (_backend(api.Algorithm.round_robin), ("roundrobin", None)),
        (_backend(api.Algorithm.least_connections), ("leastconn", None)),
        (_backend(api.Algorithm.random_two_choices), ("random(2)", None)),
        (_backend(api.Algorithm.source_hash), ("source", "map-based")),
        (_backend(api.Algorithm.ring_hash, type="Header", name="X-User"), ("hdr(X-User)", "consistent")),
        (_backend(api.Algorithm.maglev, type="Cookie", name="sid"), ("hash req.cook(sid)", "consistent")),
    ],
)
def test_haproxy_balance_follows_the_algorithm(
    backend: plan.Backend, balance: tuple[str, str | None]
) -> None:
    assert haproxy_config.haproxy_balance(PLANS["l7-proxy-routes"], backend) == balance


def test_haproxy_words_are_quoted_only_when_needed() -> None:
    assert haproxy_config.haproxy_word("/v1/x") == "/v1/x"
    assert haproxy_config.haproxy_word("a b#c") == "'a b#c'"
    assert haproxy_config.haproxy_word("it's $x \\") == '"it\'s \\$x \\\\"'
    assert haproxy_config.haproxy_word("") == "''"
    assert haproxy_config.haproxy_duration(2.5) == "2500ms"
    assert haproxy_config.haproxy_duration(60) == "60s"


def test_nftables_dsr_uses_the_neighbours_given(tmp_path: Path) -> None:
    p = PLANS["l4-dsr-nftables"]
    ruleset = formats.render(
        p,
        "nftables",
        device="lan0",
        device_mac="02:00:00:00:00:01",
        neighbours={"10.3.0.5": "02:00:00:00:00:05", "10.3.0.6": "02:00:00:00:00:06"},
    )
    assert nftables_ruleset.PLACEHOLDER_MAC not in ruleset
    assert 'hook ingress device "lan0"' in ruleset
    assert (
        "ether saddr set 02:00:00:00:00:01 ether daddr set jhash ip saddr . tcp sport mod 3 seed "
        f"{nftables_ruleset.nft_seed(p)} map {{ 0-1 : 02:00:00:00:00:05, 2 : 02:00:00:00:00:06 }} "
        'fwd to "lan0"'
    ) in ruleset
    _nft_check(ruleset.replace('"lan0"', '"eth0"'), tmp_path)
    with pytest.raises(ValueError, match="not a MAC address"):
        formats.render(p, "nftables", neighbours={"10.3.0.5": "nope"})
    with pytest.raises(ValueError, match="not an interface name"):
        formats.render(p, "nftables", device='eth0" accept')


def test_nftables_nat_masquerades_only_when_asked(tmp_path: Path) -> None:
    p = PLANS["l4-nat-nftables-weighted"]
    rule = "ct status dnat ct original ip daddr 192.0.2.20 masquerade"
    assert f"# {rule}" in formats.render(p, "nftables")
    masquerading = formats.render(p, "nftables", masquerade=True)
    assert f"\t\t{rule}\n" in masquerading
    _nft_check(masquerading, tmp_path)


def test_nftables_skips_a_listener_without_usable_endpoints(tmp_path: Path) -> None:
    p = PLANS["l4-nat-nftables-weighted"]
    drained = p.model_copy(
        update={"backends": (_backend(api.Algorithm.round_robin, (0, 0)),), "default_backend": "app"}
    )
    ruleset = formats.render(drained, "nftables")
    assert "dnat" not in ruleset.replace("ct status dnat", "")
    assert "no endpoint of weight above 0" in ruleset
    _nft_check(ruleset, tmp_path)


def test_long_names_still_give_a_valid_nftables_table(tmp_path: Path) -> None:
    p = PLANS["l4-nat-nftables-weighted"].model_copy(update={"namespace": "n" * 63, "name": "a." * 126 + "b"})
    name = nftables_ruleset.nft_table_name(p)
    assert len(name) == nftables_ruleset.NFT_NAME_MAX
    _nft_check(formats.render(p, "nftables"), tmp_path)


# --- formats that do not apply ----------------------------------------------------------------------


def test_every_format_that_does_not_apply_says_why() -> None:
    for name, p in PLANS.items():
        rendered = [fmt for fmt in formats.FORMATS if formats.unsupported(p, fmt) is None]
        assert "dataplane" in rendered, name
        assert len(rendered) >= 2 or name == "l4-proxy-udp", (name, rendered)  # only layerlb relays UDP
        for fmt in set(formats.FORMATS) - set(rendered):
            with pytest.raises(ValueError, match=r"^spec\.") as refused:
                formats.render(p, fmt)
            assert str(refused.value) == formats.unsupported(p, fmt)


@pytest.mark.parametrize(
    ("name", "fmt", "message"),
    [
        (
            "l4-nat-nftables-weighted",
            "ipvs",
            "spec.engine: format ipvs renders engine ipvs; this LoadBalancer uses nftables",
        ),
        (
            "l4-proxy-tcp",
            "ipvs",
            "spec.architecture: format ipvs renders architectures nat, dsr and tunnel, not proxy",
        ),
        (
            "l4-nat-ipvs",
            "nftables",
            "spec.engine: format nftables renders engine nftables; this LoadBalancer uses ipvs",
        ),
        (
            "l4-tunnel-ipvs",
            "nftables",
            "spec.architecture: format nftables renders architectures nat and dsr, not tunnel",
        ),
        (
            "l7-transparent",
            "nftables",
            "spec.architecture: format nftables renders architectures nat and dsr, not transparent",
        ),
        (
            "l4-dsr-ipvs",
            "haproxy",
            "spec.architecture: format haproxy renders architectures proxy and transparent, not dsr; "
            "use format ipvs or nftables",
        ),
        (
            "l4-proxy-udp",
            "haproxy",
            "spec.listeners[0].protocol: format haproxy cannot proxy UDP (listener syslog); the layerlb data plane can",
        ),
    ],
)
def test_unsupported_names_the_field(name: str, fmt: str, message: str) -> None:
    assert formats.unsupported(PLANS[name], fmt) == message


def test_kernel_formats_refuse_to_mix_address_families() -> None:
    p = PLANS["l4-nat-ipvs"]
    backend = p.backends[0].model_copy(
        update={
            "endpoints": (*p.backends[0].endpoints, plan.Endpoint(address="2001:db8::5", port=80, weight=1))
        }
    )
    mixed = p.model_copy(update={"backends": (backend,)})
    assert ipvs_rules.unsupported(mixed) == (
        "spec.backends[0].endpoints: format ipvs cannot forward the IPv4 VIP 192.0.2.10 to the IPv6 endpoint "
        "2001:db8::5; the kernel does not translate between address families"
    )
    assert formats.unsupported(mixed, "dataplane") is None


def _with_endpoint(p: plan.Plan, address: str, port: int | None) -> plan.Plan:
    first = p.backends[0]
    extra = plan.Endpoint(address=address, port=port, weight=1)
    return p.model_copy(
        update={
            "backends": (first.model_copy(update={"endpoints": (*first.endpoints, extra)}), *p.backends[1:])
        }
    )


def test_ipvs_and_haproxy_refuse_an_endpoint_listed_twice() -> None:
    # 10.1.0.7 has no port: on listener 80 it is 10.1.0.7:80, the endpoint added.
    twice = _with_endpoint(PLANS["l4-nat-ipvs"], "10.1.0.7", 80)
    assert ipvs_rules.unsupported(twice) == (
        "spec.backends[0].endpoints: format ipvs cannot list the endpoint 10.1.0.7:80 twice; "
        "merge them into one whose weight is the sum"
    )
    twice = _with_endpoint(PLANS["l4-proxy-tcp"], "10.4.0.5", 5432)
    assert formats.unsupported(twice, "haproxy") == (
        "spec.backends[0].endpoints: format haproxy cannot list the endpoint 10.4.0.5:5432 twice; "
        "merge them into one whose weight is the sum"
    )
    assert formats.unsupported(_with_endpoint(PLANS["l4-proxy-tcp"], "10.4.0.5", None), "haproxy") is None


def test_nftables_refuses_what_validation_refuses_too() -> None:
    p = PLANS["l4-nat-nftables-weighted"]
    maglev = p.model_copy(update={"backends": (_backend(api.Algorithm.maglev),), "default_backend": "app"})
    assert formats.unsupported(maglev, "nftables") == (
        "spec.backends[0].algorithm: format nftables renders round-robin and source-hash, not maglev; "
        "use engine ipvs"
    )
    sticky = p.model_copy(update={"session_affinity": plan.SessionAffinity(type=api.AffinityType.ClientIP)})
    assert formats.unsupported(sticky, "nftables") == (
        "spec.sessionAffinity.type: format nftables cannot keep ClientIP affinity; "
        "use algorithm source-hash or engine ipvs"
    )


def test_an_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown format 'yaml'"):
        formats.unsupported(PLANS["l4-nat-ipvs"], "yaml")

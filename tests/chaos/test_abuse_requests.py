"""Request abuse against `layerlb serve`'s L7 proxy: slowloris heads and bodies, huge headers, a huge body
and clients that never read; each bounded by a documented limit (docs/security.md, "Limits against
resource abuse"), never blamed on the backend, while a legitimate client keeps being served."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from pathlib import Path

from tests.chaos.abuse_lab import Lab, assert_unharmed, sources
from tests.dataplane.helpers_runtime import wait_until


def _answers(socks: list[socket.socket], within: float) -> dict[socket.socket, bytes]:
    """The first bytes each of `socks` receives (b"" for a close) within `within` seconds."""
    got: dict[socket.socket, bytes] = {}
    end = time.monotonic() + within
    while len(got) < len(socks) and time.monotonic() < end:
        waiting = [sock for sock in socks if sock not in got]
        readable, _, _ = select.select(waiting, [], [], max(0.0, end - time.monotonic()))
        for sock in readable:
            try:
                got[sock] = sock.recv(4096)
            except ConnectionResetError:
                got[sock] = b""
    return got


def test_slowloris_heads_get_408_at_the_header_timeout(tmp_path: Path) -> None:
    with Lab(tmp_path, "127.0.0.71", timeouts={"headerSeconds": 2}) as lab:
        quiet = lab.probe(2.0)
        probe = lab.probe_start(4.0)
        slow = [lab.connect(source) for source in sources(300)]
        started = time.monotonic()
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: slow\r\n")
        for _ in range(3):  # a header line every half second: each read is progress, never a whole head
            for sock in slow:
                sock.sendall(b"X-a: b\r\n")
            time.sleep(0.5)
        answers = _answers(slow, 30)
        took = time.monotonic() - started
        abused = lab.probe_result(probe)
        assert len(answers) == 300 and all(a.startswith(b"HTTP/1.1 408") for a in answers.values()), took
        print(f"300 slowloris heads answered 408 after {took:.1f} s (headerSeconds 2)")
        assert took < 2 + 15
        assert_unharmed(quiet, abused, "slowloris heads")
        for sock in slow:
            sock.close()


def test_slowloris_bodies_get_408_and_the_backend_is_not_blamed(tmp_path: Path) -> None:
    with Lab(tmp_path, "127.0.0.72", timeouts={"requestSeconds": 2}) as lab:
        quiet = lab.probe(2.0)
        probe = lab.probe_start(4.0)
        slow = [lab.connect(source) for source in sources(100)]
        for sock in slow:  # a head, part of the body, then silence
            sock.sendall(
                b"POST /upload HTTP/1.1\r\nHost: slow\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
            )
        answers = _answers(slow, 30)
        abused = lab.probe_result(probe)
        assert len(answers) == 100 and all(a.startswith(b"HTTP/1.1 408") for a in answers.values())
        # A client that stops sending its body is no backend failure: no timeout counted, none ejected.
        assert lab.metric("layerlb_upstream_failures_total", kind="timeout") == 0
        assert lab.probe(1.0).failures == 0
        assert_unharmed(quiet, abused, "slowloris bodies")
        for sock in slow:
            sock.close()


def test_huge_headers_get_431_and_cost_no_memory(tmp_path: Path) -> None:
    with Lab(tmp_path, "127.0.0.73") as lab:
        quiet = lab.probe(2.0)
        before = lab.rss()
        probe = lab.probe_start(3.0)
        huge = [lab.connect(source) for source in sources(50)]
        block = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"a" * 1000) for n in range(1000))  # ~1 MB
        for sock in huge:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: huge\r\n")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused at the limit (64 KiB)
                sock.sendall(block)
        answers = _answers(huge, 30)
        grown = lab.rss() - before
        abused = lab.probe_result(probe)
        assert len(answers) == 50 and all(a.startswith(b"HTTP/1.1 431") for a in answers.values())
        print(f"50 x 1 MB header blocks: 431, RSS +{grown / 2**20:.1f} MiB")
        assert grown < 32 * 2**20
        assert_unharmed(quiet, abused, "huge headers")
        for sock in huge:
            sock.close()


def test_a_huge_body_streams_through_in_bounded_memory(tmp_path: Path) -> None:
    size = 128 << 20
    with Lab(tmp_path, "127.0.0.74") as lab:
        quiet = lab.probe(2.0)
        before = lab.rss()
        probe = lab.probe_start(3.0)
        with lab.connect() as sock:
            sock.settimeout(60)
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: big\r\nContent-Length: %d\r\n\r\n" % size)
            block = b"u" * (1 << 20)
            for _ in range(size >> 20):
                sock.sendall(block)
            answer = sock.recv(4096)
        grown = lab.rss() - before
        abused = lab.probe_result(probe)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n%d\n" % size), answer
        print(f"a 128 MiB body: streamed, RSS +{grown / 2**20:.1f} MiB")
        assert grown < 32 * 2**20
        assert_unharmed(quiet, abused, "a huge body")


def test_clients_that_never_read_are_bounded_by_backpressure_and_cut_at_the_idle_timeout(
    tmp_path: Path,
) -> None:
    with Lab(tmp_path, "127.0.0.75", timeouts={"idleSeconds": 3}) as lab:
        quiet = lab.probe(2.0)
        before = lab.rss()
        probe = lab.probe_start(4.0)
        stuck = [lab.connect(source) for source in sources(20)]
        for sock in stuck:  # 256 MiB each, never read
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: big\r\n\r\n")
        peak = before
        end = time.monotonic() + 30
        while lab.metric("layerlb_connections_active", listener="front") > 0 and time.monotonic() < end:
            peak = max(peak, lab.rss())
            time.sleep(0.2)
        abused = lab.probe_result(probe)
        wait_until(
            lambda: lab.metric("layerlb_connections_active", listener="front") == 0, 30, "stuck ones cut"
        )
        print(f"20 clients never reading 256 MiB each: RSS peak +{(peak - before) / 2**20:.1f} MiB, cut")
        assert peak - before < 64 * 2**20
        # The stall was the clients': no timeout counted against the backend.
        assert lab.metric("layerlb_upstream_failures_total", kind="timeout") == 0
        assert_unharmed(quiet, abused, "clients that never read")
        for sock in stuck:
            sock.close()

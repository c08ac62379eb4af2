"""Connection abuse against `layerlb serve`: file descriptors exhausted, one address over its cap, the
listener's connection cap, 10,000 idle connections and a connection flood; each bounded by a documented
limit (docs/security.md, "Limits against resource abuse") while a legitimate client keeps being served."""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path

from tests.chaos.abuse_lab import Lab, assert_unharmed, cpu_share, sources
from tests.dataplane.helpers_runtime import wait_until

GET = b"GET / HTTP/1.1\r\nHost: abuse\r\n\r\n"
FLOOD_RATE = 1000  # connections per second in the short flood test


def _answer(sock: socket.socket) -> bytes:
    """What the proxy sends on `sock` until one response head is in, or it closes (10 s at most)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _silent(socks: list[socket.socket], seconds: float) -> bool:
    """Nothing to read on any of `socks` for `seconds` (they wait for a slot, unread)."""
    readable, _, _ = select.select(socks, [], [], seconds)
    return not readable


def test_out_of_descriptors_the_accept_loop_backs_off_counts_it_and_serves_the_waiting(
    tmp_path: Path,
) -> None:
    with Lab(tmp_path, "127.0.0.61", fd_limit=128, timeouts={"headerSeconds": 60}) as lab:
        held = [lab.connect(source) for source in sources(220)]  # the kernel completes them: backlog
        wait_until(lambda: lab.fds() >= 124, 30, "the serve process out of descriptors")
        busy = cpu_share(lab, 2.0)
        print(f"CPU while out of descriptors: {busy:.3f} cores")
        assert busy < 0.2, f"the accept loop spins: {busy:.2f} cores"
        assert lab.serve.poll() is None
        # Connections beyond the limit waited in the backlog, unclosed: served once descriptors free.
        for sock in held[:160]:
            sock.close()
        for sock in held[160:]:
            sock.sendall(GET)
            assert _answer(sock).startswith(b"HTTP/1.1 200"), "a connection that waited was not served"
            sock.close()
        wait_until(
            lambda: lab.metric("layerlb_accept_errors_total", reason="EMFILE") >= 1, 30, "EMFILE counted"
        )
        assert lab.probe(1.0).failures == 0
    warnings = [line for line in lab.text().splitlines() if "cannot accept (EMFILE" in line]
    assert 1 <= len(warnings) <= 3, warnings  # rate-limited: one line per 10 s


def test_one_address_over_its_cap_is_refused_while_others_are_served(tmp_path: Path) -> None:
    with Lab(
        tmp_path, "127.0.0.62", listener={"maxConnectionsPerClient": 20}, timeouts={"headerSeconds": 60}
    ) as lab:
        quiet = lab.probe(2.0)
        held = [lab.connect() for _ in range(20)]
        for sock in held[:3]:
            sock.sendall(GET)
            assert _answer(sock).startswith(b"HTTP/1.1 200")
        refused = 0
        stop = threading.Event()

        def knock() -> None:  # the same address keeps trying while the legitimate client runs
            nonlocal refused
            while not stop.is_set() and refused < 2000:
                with lab.connect() as sock:
                    sock.sendall(GET)
                    answer = _answer(sock)
                assert answer.startswith(b"HTTP/1.1 503"), answer[:60]
                refused += 1

        knocker = threading.Thread(target=knock)
        knocker.start()
        try:
            abused = lab.probe(2.0)
        finally:
            stop.set()
            knocker.join(30)
        assert refused >= 10
        wait_until(
            lambda: lab.metric("layerlb_connections_refused_total", reason="per_client") == refused,
            10,
            "refusals",
        )
        held[0].sendall(GET)
        assert _answer(held[0]).startswith(b"HTTP/1.1 200"), "a connection under the cap was cut"
        assert_unharmed(quiet, abused, "per-client cap")
        for sock in held:
            sock.close()


def test_the_listener_cap_holds_on_l7_and_l4(tmp_path: Path) -> None:
    for mode, vip in (("L7", "127.0.0.63"), ("L4", "127.0.0.64")):
        folder = tmp_path / mode
        folder.mkdir()
        with Lab(
            folder, vip, mode=mode, listener={"maxConnections": 10}, timeouts={"headerSeconds": 60}
        ) as lab:
            served = [lab.connect(source) for source in sources(10)]
            for sock in served:
                sock.sendall(GET)
                assert _answer(sock).startswith(b"HTTP/1.1 200"), mode
            waiting = [lab.connect(source) for source in sources(10)]
            for sock in waiting:
                sock.sendall(GET)
            assert _silent(waiting, 1.0), f"{mode}: a connection beyond the cap was served"
            wait_until(lambda: lab.metric("layerlb_connections_total") >= 20, 10, "all accepted")
            for sock in [lab.connect(source) for source in sources(5)]:  # twice the cap: refused
                sock.sendall(GET)
                answer = _answer(sock)
                assert answer == b"" if mode == "L4" else answer.startswith(b"HTTP/1.1 503"), (mode, answer)
                sock.close()
            assert lab.metric("layerlb_connections_refused_total", reason="max_connections") == 5, mode
            for sock in served:
                sock.close()
            for sock in waiting:  # a freed slot admits a waiting connection
                assert _answer(sock).startswith(b"HTTP/1.1 200"), mode
                sock.close()


def test_ten_thousand_idle_connections_cost_little_and_close_at_the_header_timeout(tmp_path: Path) -> None:
    with Lab(tmp_path, "127.0.0.65", timeouts={"headerSeconds": 8}) as lab:
        quiet = lab.probe(2.0)
        before = lab.rss()
        started = time.monotonic()
        idle = [lab.connect(source) for source in sources(10_000)]  # 250 per address: under the cap
        wait_until(
            lambda: lab.metric("layerlb_connections_active", listener="front") >= 10_000, 30, "all accepted"
        )
        opened = time.monotonic() - started
        grown = lab.rss() - before
        abused = lab.probe(2.0)  # while all 10,000 are held (opening them is the flood test's matter)
        print(
            f"10,000 idle connections: opened in {opened:.1f} s, RSS +{grown / 10_000:.0f} B each, {lab.fds()} fds"
        )
        assert grown / 10_000 < 16 * 1024, f"{grown / 10_000:.0f} bytes per idle connection"
        assert_unharmed(quiet, abused, "10,000 idle connections")
        # A connection that sends nothing is closed by the header timeout: all of them, without a request.
        wait_until(
            lambda: lab.metric("layerlb_connections_active", listener="front") == 0, 60, "idle ones closed"
        )
        for sock in idle:
            sock.close()


def test_a_connection_flood_leaves_the_legitimate_client_served(tmp_path: Path) -> None:
    with Lab(tmp_path, "127.0.0.66") as lab:
        quiet = lab.probe(2.0)
        stop = threading.Event()
        made = [0] * 2

        def flood(index: int) -> None:
            """Connect and close at once, from many addresses, at FLOOD_RATE / 2 each: twenty times the
            legitimate client's rate (a busy shared machine starves the proxy of any faster one; the bench
            floods flat out)."""
            started = time.monotonic()
            for count, source in enumerate(sources(200_000)):
                if stop.is_set():
                    return
                try:
                    lab.connect(source).close()
                    made[index] += 1
                except OSError:
                    pass
                ahead = started + count / (FLOOD_RATE / 2) - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

        threads = [threading.Thread(target=flood, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        try:
            abused = lab.probe(3.0)
            busy = cpu_share(lab, 1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        print(f"flood: {sum(made)} connections in ~4 s; serve CPU {busy:.2f} cores")
        assert lab.serve.poll() is None
        assert_unharmed(quiet, abused, "connection flood")

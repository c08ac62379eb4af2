"""A keep-alive HTTP load client that writes down every request: the chaos tests' independent witness.

`--workers` threads each keep one HTTP/1.1 connection open and send GETs on it one after another until the
stop file exists, so the number of requests in flight at any instant is at most `--workers`; `--recycle N`
replaces a connection after N answers (closed between requests), so connections spread again. Each request
is one JSON line: when it started and ended (`time.monotonic()`, the host's clock: pods and network
namespaces share it, so the test can put its own fault instant on the same axis), whether it got a 200,
and which peer served it (`from=` of `examples/backends.py`'s answer line: the forwarding pod's address).

A client behaves as the common ones do (Go's net/http, urllib3): a GET whose *reused* connection fails
before any byte of its answer arrived is sent once more on a new connection (RFC 9112 §9.3.1: the server
may have closed an idle connection; an idempotent request may be retried); `retried` marks it. A new
connection that fails is a failed request: nothing retries it.

Run as a script (stdlib only): inside the client pod (`kubectl exec -i client -- python3 -`) or in the
LAN client's network namespace. Prints each JSON line as its request ends, so a test can watch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import threading
import time
from typing import Any

PEER = re.compile(r"from=(\S+)")


class _Connection:
    """One kept-alive connection and the peer that answered on it (None until one did)."""

    def __init__(self, vip: str, port: int, timeout: float) -> None:
        self.http = http.client.HTTPConnection(vip, port, timeout=timeout)
        self.peer: str | None = None
        self.used = False
        self.answered = 0


def _send(connection: _Connection, host: str) -> tuple[int, str]:
    connection.http.request("GET", "/", headers={"Host": host})
    answer = connection.http.getresponse()
    body = answer.read().decode(errors="replace").strip()
    if answer.will_close:
        connection.http.close()
    return answer.status, body


def _worker(index: int, args: argparse.Namespace, lock: threading.Lock) -> None:
    connection: _Connection | None = None
    while not os.path.exists(args.stop):
        started = time.monotonic()
        record: dict[str, Any] = {"worker": index, "start": started, "retried": False}
        for attempt in (0, 1):
            if connection is None:
                connection = _Connection(args.vip, args.port, args.timeout)
            reused = connection.used
            record.update(peer=connection.peer, fresh=not reused)
            try:
                status, body = _send(connection, args.host)
            except (OSError, http.client.HTTPException) as error:
                connection.http.close()
                connection = None
                record.update(ok=False, error=f"{type(error).__name__}: {error}")
                # Nothing of an answer came back on a reused connection: once more on a new one.
                stale = isinstance(
                    error,
                    (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError),
                )
                if attempt == 0 and reused and stale:
                    record["retried"] = True
                    continue
                break
            connection.used = True
            found = PEER.search(body)
            connection.peer = found.group(1) if found else connection.peer
            record.update(ok=status == 200, peer=connection.peer, error=None if status == 200 else body)
            connection.answered += 1
            if connection.http.sock is None:  # the server closed it after this answer
                connection = None
            elif args.recycle and connection.answered >= args.recycle:
                connection.http.close()  # between requests: as clients cap requests per connection
                connection = None
            break
        record["end"] = time.monotonic()
        with lock:
            print(json.dumps(record), flush=True)
        if not record["ok"]:
            time.sleep(0.01)  # a refused connect returns at once: do not spin
    if connection is not None:
        connection.http.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="A keep-alive HTTP load client that records every request.")
    parser.add_argument("vip")
    parser.add_argument("port", type=int)
    parser.add_argument("stop", help="stop once this file exists")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--host", default="www.example.com")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--recycle", type=int, default=0, help="a new connection after N answers (0: never)")
    parser.add_argument("--limit", type=float, default=300.0, help="stop after this many seconds anyway")
    args = parser.parse_args()
    socket.setdefaulttimeout(args.timeout)
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_worker, args=(index, args, lock), daemon=True)
        for index in range(args.workers)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + args.limit
    while not os.path.exists(args.stop) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not os.path.exists(args.stop):
        open(args.stop, "w").close()
    for thread in threads:
        thread.join(args.timeout * 3)


if __name__ == "__main__":
    main()

"""The seed corpora, by name: `python -m tests.fuzz.seeds` writes them to `tests/fuzz/corpus/<target>/<name>`.

Every framing rule layerlb holds (issue #18) has a seed here, so each fuzz run starts from it and the
mutations explore around it: a Content-Length past 64 bits, Transfer-Encoding in HTTP/1.0, Content-Length
with Transfer-Encoding, duplicate and list-valued Content-Length, bare CR and LF, obs-fold, chunk
extensions with control bytes. The HTTP request seeds go to the differential target as they are and to
the request target behind one byte (the target reads its first byte as where to cut the reads).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Final

CORPUS: Final = Path(__file__).parent / "corpus"
_TESTDATA: Final = Path(__file__).parents[2] / "testdata" / "out"

_H = b"Host: a.example\r\n"

REQUESTS: Final[dict[str, bytes]] = {
    "get": b"GET /path?q=1 HTTP/1.1\r\n" + _H + b"Cookie: a=1\r\n\r\n",
    "post_length": b"POST /p HTTP/1.1\r\n" + _H + b"Content-Length: 5\r\n\r\nhello",
    "post_chunked": b"POST /p HTTP/1.1\r\n" + _H + b"Transfer-Encoding: chunked\r\n\r\n"
    b'5;name="v"\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n',
    "pipelined": b"GET /1 HTTP/1.1\r\n"
    + _H
    + b"\r\nPUT /2 HTTP/1.1\r\n"
    + _H
    + b"Content-Length: 2\r\n\r\nab"
    b"GET /1 HTTP/1.1\r\n" + _H + b"\r\n",
    "http10_keep_alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    "connection_close": b"GET / HTTP/1.1\r\n" + _H + b"Connection: close, x-hop\r\nX-Hop: 1\r\n\r\n",
    "upgrade": b"GET /ws HTTP/1.1\r\n" + _H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00",
    "absolute_form": b"GET http://b.example:8080/x?y HTTP/1.1\r\n" + _H + b"\r\n",
    "expect_continue": b"PUT /u HTTP/1.1\r\n" + _H + b"Expect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
    "forwarding_headers": b"GET / HTTP/1.1\r\n"
    + _H
    + b"X-Forwarded-For: 1.2.3.4\r\nForwarded: for=5.6.7.8\r\n"
    b"X-Forwarded-Proto: https\r\n\r\n",
    "codings_then_chunked": b"POST / HTTP/1.1\r\n"
    + _H
    + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "extension_method": b"FOOBAR / HTTP/1.1\r\n" + _H + b"\r\n",
    "http_1_2": b"GET / HTTP/1.2\r\n" + _H + b"\r\n",
    "leading_crlf": b"\r\n\r\nGET / HTTP/1.1\r\n" + _H + b"\r\n",
    # Findings, kept in the corpus so every run tries them again (tests/fuzz/test_regressions.py).
    "found_two_spaces_before_version": b"GET /admin  HTTP/1.1\r\n" + _H + b"\r\n",
    "found_cr_before_request_line": b"\r\n\rGET / HTTP/1.1\r\n" + _H + b"\r\n",
    "found_lf_in_request_line": b"GET /1.\nHost:exe:z HTTP/1.1\r\n" + _H + b"\r\n",
    "found_trailer_framing_fields": b"POST / HTTP/1.1\r\n" + _H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"0\r\nContent-Length: 1, 3\r\n\r\n",
    # The framing rules of #18: each refused or normalised so that no two readers can disagree.
    "rule_length_over_64_bits": b"POST / HTTP/1.1\r\n"
    + _H
    + b"Content-Length: 18446744073709551617\r\n\r\nx",
    "rule_te_in_http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    "rule_length_and_te": b"POST / HTTP/1.1\r\n"
    + _H
    + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "rule_duplicate_length": b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "rule_conflicting_length": b"POST / HTTP/1.1\r\n"
    + _H
    + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
    "rule_list_length": b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: 1, 1\r\n\r\nx",
    "rule_bare_lf": b"GET / HTTP/1.1\n" + _H + b"\r\n",
    "rule_bare_cr": b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
    "rule_obs_fold": b"GET / HTTP/1.1\r\n" + _H + b"X: a\r\n b\r\n\r\n",
    "rule_chunk_extension_control": b"POST / HTTP/1.1\r\n" + _H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1;a=\x01b\r\nx\r\n0\r\n\r\n",
}

RESPONSES: Final[dict[str, bytes]] = {
    # The first byte: odd answers a HEAD request, and it picks the read cuts.
    "length": b"\x00HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"\x02HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nX: 1\r\n\r\n",
    "head": b"\x01HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    "no_content": b"\x10HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
    "informational": b"\x20HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "switching": b"\x30HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81",
    "until_close": b"\x40HTTP/1.0 200 OK\r\nConnection: x\r\n\r\nthe rest",
    "length_and_te": b"\x50HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "length_over_64_bits": b"\x60HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551617\r\n\r\n",
    "obs_fold": b"\x70HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
}

CHUNKED: Final[dict[str, bytes]] = {
    "plain": b"\x00" + b"5\r\nhello\r\n0\r\n\r\nnext",
    "extensions": b"\x11" + b'3;a=b;c="d\\"e"\r\nabc\r\n0;z\r\n\r\n',
    "trailers": b"\x25" + b"1\r\nx\r\n0\r\nX-A: 1\r\nX-B:\t2\r\n\r\n",
    "extension_control": b"\x00" + b"1;a=\x01\r\nx\r\n0\r\n\r\n",
    "size_overflow": b"\x33" + b"10000000000000001\r\nx\r\n",
    "bare_lf": b"\x00" + b"1\nx\r\n0\r\n\r\n",
}


def _v2(command: int, family: int, block: bytes) -> bytes:
    return b"\r\n\r\n\x00\r\nQUIT\n" + struct.pack("!BBH", 0x20 | command, family, len(block)) + block


PROXY: Final[dict[str, bytes]] = {
    "v1_tcp4": b"\x00PROXY TCP4 192.0.2.1 198.51.100.2 40000 443\r\nGET /",
    "v1_tcp6": b"\x31PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
    "v1_unknown": b"\x42PROXY UNKNOWN ignored\r\n",
    "v2_tcp4": b"\x00" + _v2(1, 0x11, bytes(range(8)) + b"\x9c\x40\x01\xbb") + b"rest",
    "v2_udp6_tlv": b"\x53" + _v2(1, 0x22, bytes(32) + b"\x00\x35\x00\x35" + b"\x04\x00\x01x"),
    "v2_local": b"\x27" + _v2(0, 0x00, b""),
    "v2_unix": b"\x00" + _v2(1, 0x31, bytes(216)),
}

PLANS: Final[dict[str, bytes]] = {
    "empty_list": b"\x01[]",
    "deep_nesting": b"\x00" + b"[" * 5000,
    **{
        path.stem: b"\x00" + path.read_bytes()
        for path in sorted(_TESTDATA.glob("*.dataplane"))
        if path.stem in ("l4-proxy-tcp", "l7-https", "l7-proxy-routes", "l4-nat-ipvs-ipv6")
    },
}

SEEDS: Final[dict[str, dict[str, bytes]]] = {
    "http_request": {
        **{name: b"\x13" + data for name, data in REQUESTS.items()},
        "found_crlf_cut_before_lf": b"\x12\r\n\r\nGET / HTTP/1.1\r\n" + _H + b"\r\n",
    },
    "differential": REQUESTS,
    "http_response": RESPONSES,
    "response_differential": {
        **RESPONSES,
        "found_status_line_control": b"\x00HTTP/1.1 204 No Cont\x00ent\r\n\r\n",
        "found_http10_informational": b"\x00HTTP/1.0 105 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    },
    "chunked": CHUNKED,
    "proxy_protocol": PROXY,
    "plan_json": PLANS,
}


def write() -> None:
    """Write every seed (a fuzz run may add files beside them; those are not committed)."""
    for target, seeds in SEEDS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    write()

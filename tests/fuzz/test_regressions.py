"""What the fuzzers found, each as the smallest input that showed it, kept so it stays fixed."""

from __future__ import annotations

import pytest
from layerlb_dataplane.control import config

from tests.fuzz import targets


def test_empty_lines_before_a_request_line_cut_between_cr_and_lf_are_still_skipped() -> None:
    # http_request found it: a read ending in the CR of a leading CRLF was refused as a bare CR,
    # so whether a client got a 400 depended on where the network cut its bytes.
    events, refusal, _ = targets.frame_requests([b"\r\n\r", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert refusal is None
    assert [event[:3] for event in events] == [("request", b"GET", b"/"), ("end", b"")]


def test_a_bare_cr_before_a_request_line_is_still_refused() -> None:
    _, refusal, _ = targets.frame_requests([b"\r\n\rGET / HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert refusal == "400 bare CR or LF before the request line"


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000])
def test_plan_json_nested_deeper_than_the_stack_is_invalid_config_not_a_crash(text: str) -> None:
    # plan_json found it: json's decoder recursed into a RecursionError, which the ConfigMap watch
    # took for a bug and retried forever instead of reporting the Plan as invalid.
    with pytest.raises(config.InvalidConfig) as error:
        config.parse_plans("cm/plan.json", text, allow_empty=True)
    assert error.value.lines == ["cm/plan.json: -: not Plan JSON: nested too deeply"]


@pytest.mark.parametrize(
    "line", [b"GET /admin  HTTP/1.1", b"GET /admin   HTTP/1.1", b"GET http://a/x  HTTP/1.1"]
)
def test_a_request_line_with_more_than_one_space_before_the_version_is_refused(line: bytes) -> None:
    # differential found it: llhttp took `GET /admin  HTTP/1.1`, and the target became `/admin ` (a route
    # for /admin missed it, an upstream splitting on whitespace would serve /admin); h11 refuses it.
    events, refusal, _ = targets.frame_requests([line + b"\r\nHost: a\r\n\r\n"])
    assert events == []
    assert refusal == "400 malformed request line (one space between method, target and version)"


@pytest.mark.parametrize("reason", [b"No Cont\x00ent", b"O\x01K", b"O\x7fK"])
def test_a_status_line_with_a_control_character_is_a_502_not_forwarded(reason: bytes) -> None:
    # response_differential found it: llhttp lets any byte through in a reason phrase, and the proxy
    # forwards the status line as received, so a backend's NUL reached the client; h11 refuses it.
    events, refusal = targets.frame_responses([b"HTTP/1.1 204 " + reason + b"\r\n\r\n"], False)
    assert events == []
    assert refusal == "502 control character in the response status line"


def test_a_bare_lf_inside_the_request_line_is_refused_in_one_read_too() -> None:
    # The long http_request run found it: llhttp ends the request line at the LF and reads
    # `Host:exe:z HTTP/1.1` as a header, while layerlb took `/1.\nHost:exe:z` for the target and would have
    # forwarded the LF (a Host header to a lenient upstream). Only a head arriving in pieces was refused.
    data = b"GET /1.\nHost:exe:z HTTP/1.1\r\nHost: a.example\r\n\r\n"
    for reads in ([data], [data[:9], data[9:]]):
        events, refusal, _ = targets.frame_requests(reads)
        assert events == []
        assert refusal is not None and "bare LF" in refusal


@pytest.mark.parametrize(
    "reads",
    [
        [b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n"],
        [b"\r\n", b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n"],
        [b"\r\n\r", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"],
    ],
)
def test_a_lone_cr_before_the_request_line_is_refused_not_made_part_of_the_method(reads: list[bytes]) -> None:
    # The long http_request run found it: llhttp skips a CR before the request line, while the line as
    # cut here began with it, so `\rGET / HTTP/1.1` was forwarded upstream with a method of "\rGET".
    events, refusal, _ = targets.frame_requests(reads)
    assert events == []
    assert refusal == "400 bare CR or LF before the request line"

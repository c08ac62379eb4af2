"""The chunked decoder and the framing header rules at their exact limits and with their exact statuses, where
framing's mutation run found nothing checking them: the size line's 4 KiB bound, the trailer section's
64 KiB bound counted with its CRLFs, the status of each refusal (a 400 is not a 431, a 501 is not a 400),
and chunk data passed through whole or sliced."""

from __future__ import annotations

import pytest
from layerlb_dataplane.http.h1 import framing
from layerlb_dataplane.http.h1.framing import ChunkedDecoder, ParseError


def decode(data: bytes, decoder: ChunkedDecoder | None = None) -> tuple[bytes, bytes | bytearray | None]:
    body: list[bytes] = []
    rest = (decoder or ChunkedDecoder()).feed(data, lambda piece: body.append(bytes(piece)))
    return b"".join(body), rest


def refusal(data: bytes, decoder: ChunkedDecoder | None = None) -> int:
    with pytest.raises(ParseError) as caught:
        decode(data, decoder)
    return caught.value.status


def test_chunk_data_arrives_whole_or_in_pieces_and_the_rest_is_returned() -> None:
    assert decode(b"3\r\nabc\r\n0\r\n\r\nNEXT") == (b"abc", b"NEXT")
    decoder = ChunkedDecoder()
    pieces: list[bytes] = []
    assert decoder.feed(b"6\r\nab", lambda piece: pieces.append(bytes(piece))) is None
    assert decoder.feed(b"cdef", lambda piece: pieces.append(bytes(piece))) is None  # all of it is data
    assert decoder.feed(b"\r", lambda piece: pieces.append(bytes(piece))) is None
    assert decoder.feed(b"\n0\r\n\r\n", lambda piece: pieces.append(bytes(piece))) == b""
    assert pieces == [b"ab", b"cdef"]


def test_data_not_followed_by_crlf_is_a_400() -> None:
    assert refusal(b"3\r\nabcX\r\n0\r\n\r\n") == 400
    assert refusal(b"3\r\nabcX") == 400  # one byte after the data, and it is not CR
    assert refusal(b"3\r\nabc\n") == 400  # a bare LF, at once (it sorts below CR)


def test_a_size_line_may_be_4096_bytes_long_but_not_longer() -> None:
    assert decode(b"0" * framing.MAX_CHUNK_LINE) == (b"", None)  # waits for more
    assert refusal(b"0" * (framing.MAX_CHUNK_LINE + 1)) == 400
    assert refusal(b"12" + b"0" * framing.MAX_CHUNK_LINE) == 400
    after_a_chunk = b"1\r\na\r\n"  # the line starts further into the data
    assert decode(after_a_chunk + b"0" * framing.MAX_CHUNK_LINE) == (b"a", None)
    assert refusal(after_a_chunk + b"0" * (framing.MAX_CHUNK_LINE + 1)) == 400


def test_the_trailer_section_is_bounded_with_its_line_ends_and_refused_with_431() -> None:
    line = b"X: " + b"a" * 95  # 98 bytes, 100 with CRLF
    fits = b"0\r\n" + (line + b"\r\n") * 3 + b"\r\n"
    assert decode(fits, ChunkedDecoder(max_trailers=300)) == (b"", b"")
    assert refusal(fits, ChunkedDecoder(max_trailers=299)) == 431
    assert refusal(b"0\r\nbad trailer\r\n\r\n") == 400


@pytest.mark.parametrize(
    ("values", "only_chunked", "status"),
    [
        ([b"gzip"], False, 400),  # not ending with chunked
        ([b"chunked, chunked"], False, 400),
        ([b"br, chunked"], False, 400),  # an unknown coding in a response
        ([b"br, chunked"], True, 501),  # and in a request
        ([b"gzip, chunked"], True, 501),  # known, but not served in a request
    ],
)
def test_transfer_codings_refused_with_their_status(
    values: list[bytes], only_chunked: bool, status: int
) -> None:
    with pytest.raises(ParseError) as caught:
        framing.parse_codings(values, only_chunked=only_chunked)
    assert caught.value.status == status


def test_accepted_transfer_codings() -> None:
    assert framing.parse_codings([b"chunked"], only_chunked=True) == b""
    assert framing.parse_codings([b"gzip", b"Chunked"]) == b"gzip"


@pytest.mark.parametrize(
    ("values", "only_one", "expected"),
    [
        ([b"5"], True, 5),
        ([b"5, 5"], False, 5),
        ([b"5", b"5"], False, 5),
        ([b"5, 5"], True, 400),
        ([b"5", b"5"], True, 400),
        ([b"5, 6"], False, 400),
        ([b"6", b"5"], False, 400),  # conflicting, whichever is larger first
        ([b"+5"], False, 400),
    ],
)
def test_content_length_values(values: list[bytes], only_one: bool, expected: int) -> None:
    if expected != 400:
        assert framing.parse_length(values, only_one=only_one) == expected
        return
    with pytest.raises(ParseError) as caught:
        framing.parse_length(values, only_one=only_one)
    assert caught.value.status == 400

"""Line framing and the RETR/TOP body encoder, including chunk-edge properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbag.protocol.dots import DotDecoder, MessageEncoder, encode_message, encode_whole
from mailbag.protocol.lines import Line, LineReader, LineTooLong, apply_erase
from mailbag.wireform import to_wire


def unstuff(wire: bytes) -> bytes:
    """What a client reconstructs from a multi-line body (RFC 1939 section 3)."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[:-3]  # ends with CRLF (or is empty)
    lines = body.split(b"\r\n")
    out = [line[1:] if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(out)


def test_encode_dot_stuffs_leading_dots() -> None:
    # RFC 1939 section 3: lines beginning with "." are byte-stuffed.
    assert encode_message(b".a\n..b\n.\nc\n") == b"..a\r\n...b\r\n..\r\nc\r\n.\r\n"


def test_encode_message_without_trailing_newline_ends_correctly() -> None:
    assert encode_message(b"Subject: x\n\nno newline") == b"Subject: x\r\n\r\nno newline\r\n.\r\n"


def test_encode_empty_message() -> None:
    assert encode_message(b"") == b".\r\n"


def test_encode_top_zero_lines_gives_headers_and_blank_line() -> None:
    msg = b"A: 1\nB: 2\n\nbody1\nbody2\n"
    assert encode_message(msg, 0) == b"A: 1\r\nB: 2\r\n\r\n.\r\n"


def test_encode_top_counts_body_lines() -> None:
    msg = b"A: 1\n\n.one\ntwo\nthree\n"
    assert encode_message(msg, 2) == b"A: 1\r\n\r\n..one\r\ntwo\r\n.\r\n"


def test_encode_top_more_lines_than_body_gives_whole_message() -> None:
    msg = b"A: 1\n\none\n"
    assert encode_message(msg, 10) == encode_message(msg)


def test_encode_top_header_only_message() -> None:
    assert encode_message(b"A: 1\nB: 2", 0) == b"A: 1\r\nB: 2\r\n.\r\n"


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    parts, prev = [], 0
    for p in points:
        parts.append(data[prev:p])
        prev = p
    parts.append(data[prev:])
    return parts


message_bytes = st.binary(max_size=200).map(
    lambda b: bytes(b"a.\r\n: "[x % 6] for x in b)
)


@settings(max_examples=500, deadline=None)
@given(message_bytes, st.lists(st.integers(0, 200), max_size=6))
def test_encoder_chunking_never_changes_output(data: bytes, cuts: list[int]) -> None:
    whole = encode_message(data)
    encoder = MessageEncoder()
    pieces = b"".join(encoder.feed(p) for p in _chunked(data, cuts)) + encoder.finish()
    assert pieces == whole


@settings(max_examples=500, deadline=None)
@given(message_bytes, st.lists(st.integers(0, 200), max_size=6), st.integers(0, 5))
def test_top_chunking_never_changes_output(data: bytes, cuts: list[int], n: int) -> None:
    whole = encode_message(data, n)
    encoder = MessageEncoder(n)
    out = b""
    for piece in _chunked(data, cuts):
        out += encoder.feed(piece)
    assert out + encoder.finish() == whole


def _reference_body(data: bytes) -> bytes:
    """RFC 1939 section 3 spelled out line by line, independently of the codec's tricks.

    Every LF ends a line (a CR before it belongs to the line ending); a CR
    elsewhere is data; the last line is ended if it is not; a line starting
    with "." gets one more; then the terminating ".".
    """
    if not data:
        return b".\r\n"
    *ended, last = data.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in ended]
    if last:
        lines.append(last)  # an unended last line keeps even a trailing CR
    out = [(b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines]
    return b"".join(out) + b".\r\n"


@settings(max_examples=1000, deadline=None)
@given(message_bytes, st.lists(st.integers(0, 200), max_size=6))
def test_encoder_output_equals_a_line_by_line_reference(data: bytes, cuts: list[int]) -> None:
    """The fast paths (regex stuffing, CRLF files left alone) never change a byte."""
    encoder = MessageEncoder()
    pieces = b"".join(encoder.feed(p) for p in _chunked(data, cuts)) + encoder.finish()
    assert pieces == encode_message(data) == _reference_body(data)
    decoder = DotDecoder()
    decoded = b"".join(decoder.feed(p) for p in _chunked(pieces, cuts))
    assert decoder.done and decoded == to_wire(data)


#: Bare-LF messages (the usual Maildir file), the case ``encode_whole`` handles itself.
lf_message_bytes = st.binary(max_size=200).map(lambda b: bytes(b"a.\n: "[x % 4] for x in b))


@settings(max_examples=1000, deadline=None)
@given(st.one_of(lf_message_bytes, message_bytes))
def test_encode_whole_equals_the_streaming_encoder(data: bytes) -> None:
    """RETR's whole-message fast path gives exactly the streamed bytes (RFC 1939 section 3)."""
    assert b"".join(encode_whole(data)) == encode_message(data) == _reference_body(data)


@pytest.mark.parametrize("data", [b"", b".", b"\n", b".\n.", b"a\n.\n", b"..\n\n.", b"x\r\n.y"])
def test_encode_whole_edges(data: bytes) -> None:
    assert b"".join(encode_whole(data)) == encode_message(data)


@settings(max_examples=500, deadline=None)
@given(message_bytes)
def test_unstuffed_body_is_wire_form_and_size_matches(data: bytes) -> None:
    # The size in LIST equals the octets a client gets back after un-stuffing.
    wire = encode_message(data)
    restored = unstuff(wire)
    assert restored == to_wire(data)


def test_reader_accepts_crlf_and_lf() -> None:
    reader = LineReader(100)
    reader.feed(b"A\r\nB\nC")
    assert reader.next_line() == Line(b"A")
    assert reader.next_line() == Line(b"B")
    assert reader.next_line() is None


def test_reader_line_split_across_chunks() -> None:
    reader = LineReader(100)
    reader.feed(b"ST")
    assert reader.next_line() is None
    reader.feed(b"AT\r")
    assert reader.next_line() is None
    reader.feed(b"\n")
    assert reader.next_line() == Line(b"STAT")


def test_reader_too_long_discards_rest_of_line() -> None:
    reader = LineReader(10)
    reader.feed(b"x" * 50)
    assert reader.next_line() == LineTooLong(10)
    reader.feed(b"yyy\r\nNOOP\r\n")
    assert reader.next_line() == Line(b"NOOP")


def test_reader_iac_split_across_chunks() -> None:
    reader = LineReader(100)
    reader.feed(b"US\xff")
    reader.feed(b"\xfd")
    reader.feed(b"\x01ER\xff\xffx\r\n")
    assert reader.next_line() == Line(b"USER\xffx")


def test_erase_removes_whole_utf8_character() -> None:
    assert apply_erase("密码x".encode() + b"\x08\x08") == "密".encode()
    assert apply_erase(b"\x7f\x7fab\x7f") == b"a"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_reader_never_buffers_beyond_limit(data: bytes, cuts: list[int]) -> None:
    reader = LineReader(64)
    for piece in _chunked(data, cuts):
        reader.feed(piece)
        while True:
            item = reader.next_line()
            if item is None:
                break
            if isinstance(item, Line):
                assert b"\n" not in item.data
        assert reader.buffered <= 64 + len(piece)


def test_reader_strips_telnet_cr_nul_before_line_end() -> None:
    reader = LineReader(100)
    reader.feed(b"user demo\r\x00\r\n")
    assert reader.next_line() == Line(b"user demo")

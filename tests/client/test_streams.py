"""Dot-unstuffing and local line conversion, at every possible chunk edge."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailbag.client import dotstuff, localstore
from mailbag.client.dotstuff import DotUnstuffer, stuff
from mailbag.client.localstore import LocalLines

line = st.lists(st.sampled_from([b".", b"a", b"\r", b"..", b"From ", b">", b"\n"]), max_size=6)
message = st.lists(line.map(b"".join), max_size=8).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


def feed_all(decoder: DotUnstuffer, data: bytes, cuts: list[int]) -> bytes:
    out, pos = [], 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out.append(decoder.feed(data[pos:cut]))
        pos = cut
    return b"".join(out)


@given(message, st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_retr_unstuffing_is_exact_at_any_chunk_edge(msg: bytes, cuts: list[int]) -> None:
    dotstuff.MAX_HELD_LINE = 5  # also exercise the long-line path
    try:
        wire = stuff(msg) + b"+OK next"
        decoder = DotUnstuffer()
        out = feed_all(decoder, wire, [c % (len(wire) + 1) for c in cuts])
    finally:
        dotstuff.MAX_HELD_LINE = 64 * 1024
    assert decoder.done
    assert out == msg
    assert decoder.trailing == b"+OK next"


def test_retr_very_long_line_streams_without_limit() -> None:
    body = b"x" * 5_000_000 + b"\r\n.end\r\n"
    wire = stuff(body)
    decoder = DotUnstuffer()
    out = b"".join(decoder.feed(wire[i:i + 65536]) for i in range(0, len(wire), 65536))
    assert decoder.done and out == body


def test_retr_empty_message() -> None:
    decoder = DotUnstuffer()
    assert decoder.feed(b".\r\n") == b"" and decoder.done


@given(message, st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_fetch_local_lines_match_whole_conversion(msg: bytes, cuts: list[int]) -> None:
    localstore.MAX_PARTIAL = 4
    try:
        conv = LocalLines(mboxrd=True)
        out, pos = [], 0
        for cut in [*sorted({c % (len(msg) + 1) for c in cuts}), len(msg)]:
            out.append(conv.feed(msg[pos:cut]))
            pos = cut
        out.append(conv.finish())
    finally:
        localstore.MAX_PARTIAL = 64 * 1024
    import re
    expected = re.sub(rb"(?m)^(>*From )", rb">\1", msg.replace(b"\r\n", b"\n"))
    got = b"".join(out)
    if not msg:
        assert got == b""
    else:
        assert got == expected

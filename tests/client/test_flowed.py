"""format=flowed (RFC 3676) is re-flowed by ``read``."""

from __future__ import annotations

from mailbag.client.flowed import unflow
from mailbag.client.render import parse_bytes, render
from tests.client.conftest import Run
from tests.client.pop3servers import Target


def test_read_flowed_soft_breaks_are_joined() -> None:
    # RFC 3676 section 4.2: a line ending in SP continues on the next line.
    assert unflow("This is a long \nparagraph.\nNext line.\n") == (
        "This is a long paragraph.\nNext line.\n")


def test_read_flowed_delsp_removes_the_trailing_space() -> None:
    # RFC 3676 section 4.2 with DelSp=yes (CJK text has no spaces between words).
    assert unflow("这是一个很长的 \n段落。\n", delsp=True) == "这是一个很长的段落。\n"


def test_read_flowed_space_stuffing_removed() -> None:
    # RFC 3676 section 4.4: a leading space (stuffed before "From ", ">", " ") is removed.
    assert unflow(" From here \n >not a quote\n") == "From here >not a quote\n"


def test_read_flowed_quotes_keep_depth_and_do_not_merge_across_depths() -> None:
    # RFC 3676 section 4.5: a flowed line followed by another quote depth ends the paragraph.
    text = "> quoted line \n> continues\n>> deeper \nnot quoted\n"
    assert unflow(text) == "> quoted line continues\n> > deeper \nnot quoted\n"


def test_read_flowed_signature_separator_is_fixed() -> None:
    # RFC 3676 section 4.3: "-- " is never flowed.
    assert unflow("text\n-- \nsig\n") == "text\n-- \nsig\n"


def test_read_fixed_text_is_left_alone() -> None:
    raw = (b"Subject: fixed\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           b"line one \r\nline two\r\n")
    assert render(parse_bytes(raw)).body == "line one \nline two\n"


def test_read_flowed_end_to_end(pop3: Target, run_cli: Run) -> None:
    raw = ("Subject: flowed\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8; format=flowed; delsp=yes\r\n\r\n"
           "周五晚上七点在老地方 \r\n聚餐，请回复。\r\n> Quoted text that was  \r\n> wrapped.\r\n"
           ).encode()
    pop3.deliver(raw)
    result = run_cli(pop3, "read", "1")
    assert result.code == 0, result.err
    assert "周五晚上七点在老地方聚餐，请回复。" in result.out
    # With DelSp=yes a real space before a soft break is sent as two spaces.
    assert "> Quoted text that was wrapped." in result.out

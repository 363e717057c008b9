"""Charset superset mapping, detection, and RFC 2047 decoding edge cases."""

from __future__ import annotations

import base64

import pytest

from mailbag.client.charsets import decode_bytes, normalize_label
from mailbag.client.headers import decode_addresses, decode_words, parse_date, short_date


@pytest.mark.parametrize(("label", "codec"), [
    ("gb2312", "gb18030"), ("GBK", "gb18030"), ("cp936", "gb18030"), ("x-gbk", "gb18030"),
    ("big5", "big5hkscs"), ("ISO-2022-JP", "iso2022_jp_ext"), ("iso-8859-1", "cp1252"),
    ("KOI8-R", "koi8-r"), ("utf8", "utf-8"), ("\"UTF-8\"", "utf-8"),
    ("x-unknown", None), ("no-such-charset", None), (None, None),
])
def test_read_charset_labels_map_to_supersets(label: str | None, codec: str | None) -> None:
    assert normalize_label(label) == codec


def test_read_unknown_label_falls_back_to_utf8() -> None:
    decoded = decode_bytes("中文".encode(), "x-klingon")
    assert (decoded.text, decoded.used, decoded.guessed) == ("中文", "utf-8", True)


def test_read_wrong_label_falls_back_to_detection() -> None:
    text = "这是一段用GBK编码却被标成UTF-8的中文文字，检测器应该能够识别出来并正确显示。"
    decoded = decode_bytes(text.encode("gbk"), "utf-8")
    assert decoded.text == text and decoded.guessed


def test_read_us_ascii_label_with_8bit_utf8() -> None:
    assert decode_bytes("café".encode(), "us-ascii").text == "café"


def test_read_unlabelled_iso2022jp_is_recognised() -> None:
    assert decode_bytes("日本語".encode("iso-2022-jp")).text == "日本語"


def test_read_undecodable_bytes_are_replaced_not_raised() -> None:
    decoded = decode_bytes(b"\xff\xfe\x00abc", "utf-16-never")
    assert isinstance(decoded.text, str)


def test_read_q_encoded_underscore_is_space() -> None:
    assert decode_words("=?utf-8?Q?hello_world?=") == "hello world"


def test_read_b_encoded_word_without_padding() -> None:
    payload = base64.b64encode("中文!".encode()).decode()
    assert payload.endswith("==")
    assert decode_words(f"=?utf-8?B?{payload.rstrip('=')}?=") == "中文!"


def test_read_encoded_words_glued_to_text() -> None:
    word = "=?gbk?B?" + base64.b64encode("标题".encode("gbk")).decode() + "?="
    assert decode_words(f"[list]{word}") == "[list]标题"


def test_read_adjacent_words_different_charsets_keep_both() -> None:
    a = "=?gbk?B?" + base64.b64encode("中".encode("gbk")).decode() + "?="
    b = "=?big5?B?" + base64.b64encode("文".encode("big5")).decode() + "?="
    assert decode_words(f"{a} {b}") == "中文"


def test_read_space_between_text_and_word_is_kept() -> None:
    assert decode_words("Re: =?utf-8?B?5Lit?= end") == "Re: 中 end"


def test_read_rfc2231_language_in_encoded_word() -> None:
    assert decode_words("=?utf-8*zh?Q?=E4=B8=AD?=") == "中"


def test_read_address_with_comma_inside_encoded_name() -> None:
    name = "=?utf-8?Q?Wang=2C_Xiaoming?="
    assert decode_addresses(f"{name} <w@example.cn>, b@example.cn") == [
        ("Wang, Xiaoming", "w@example.cn"), ("", "b@example.cn")]


def test_read_bad_date_is_none() -> None:
    assert parse_date("not a date") is None
    when = parse_date("Mon, 25 Oct 2004 14:24:27 +0800")
    assert short_date(when) == "2004-10-25 14:24"

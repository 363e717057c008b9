"""The corpus in tests/fixtures/mail renders to the expected text.

Each fixture is a case from the issue: Chinese charsets (and lies about
them), encoded-words in Q and B, split multi-byte characters, RFC 2231
names, HTML-only mail, alternative and nested multiparts, no charset,
broken MIME, and the two CPython header bugs we work around.
"""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from mailbag.client.render import Rendered, parse_bytes, render, safe_filename

CORPUS = Path(__file__).parent.parent / "fixtures" / "mail"


def load(name: str) -> Rendered:
    return render(parse_bytes((CORPUS / name).read_bytes()))


def test_read_chinese_gb2312_base64_message() -> None:
    msg = load("zh_plain.eml")
    assert msg.subject == "周五聚餐的安排"
    assert msg.sender == "王小明 <xiaoming@example.cn>"
    assert msg.body == "你好！\n\n周五晚上七点在老地方聚餐，请回复是否参加。\n\n小明\n"
    assert msg.charset_note is None


def test_read_gbk_body_outside_gb2312() -> None:
    assert load("gbk_body.eml").body == "朱镕基、陶喆和王珺\n"


def test_read_gb2312_label_on_gbk_bytes_decodes_as_gb18030() -> None:
    msg = load("gb2312_mislabelled.eml")
    assert msg.body == "朱镕基、陶喆和王珺\n"
    assert msg.subject == "陶喆"  # the gb2312-labelled encoded-word holds GBK bytes too
    assert "\ufffd" not in msg.body


def test_read_gb18030_four_byte_sequences() -> None:
    assert load("gb18030_body.eml").body == "四字节：😀 𠀀 完\n"


def test_read_big5_subject_sender_and_body() -> None:
    msg = load("big5.eml")
    assert (msg.subject, msg.sender) == ("繁體中文測試", "陳大文 <tai@example.tw>")
    assert msg.body == "這是一封繁體中文郵件。\n"


def test_read_iso2022jp_subject_sender_and_body() -> None:
    msg = load("iso2022jp.eml")
    assert (msg.subject, msg.sender) == ("日本語のテスト", "山田太郎 <taro@example.jp>")
    assert msg.body == "こんにちは、世界。\n"


def test_read_q_and_b_encoded_words_in_many_charsets() -> None:
    msg = load("encoded_words.eml")
    # RFC 2047 section 6.2: whitespace between adjacent encoded-words is dropped.
    assert msg.subject == "Re: 会议纪要(第二版) done"
    assert msg.sender == "李四 <lisi@example.cn>"  # encoded-word inside a quoted string
    assert msg.to == "张三 <zs@example.cn>, Müller <m@example.de>"
    assert msg.cc == "Иван <ivan@example.ru>"


def test_read_split_multibyte_character_across_encoded_words() -> None:
    msg = parse_bytes((CORPUS / "split_encoded_word.eml").read_bytes())
    assert render(msg).subject == "中文标题"
    from mailbag.client.render import header_text
    assert header_text(msg, "comments") == "中文"


def test_read_cpython_79728_folded_display_name_has_no_extra_spaces() -> None:
    assert load("cpython_79728.eml").sender == "Отдел по работе с прохов <dept@example.ru>"


def test_read_cpython_128110_adjacent_words_in_address_not_split() -> None:
    assert load("cpython_128110.eml").sender == (
        "Bérénice-Amélie Rosemonde Dûbois-Bénard <rose@example.com>")


def test_read_cpython_bugs_still_present_in_stdlib_documented() -> None:
    """Shows why headers.py exists; if CPython fixes it this test says so (xfail-free)."""
    raw = (CORPUS / "cpython_128110.eml").read_bytes()
    stdlib = str(BytesParser(policy=policy.default).parsebytes(raw)["From"])
    assert stdlib in {"Bérénice-Amélie Rosemonde Dûbois-Béna rd <rose@example.com>",
                      "Bérénice-Amélie Rosemonde Dûbois-Bénard <rose@example.com>"}


def test_read_raw_8bit_gbk_headers_use_body_charset() -> None:
    msg = load("raw8bit_header.eml")
    assert (msg.subject, msg.sender) == ("原始八位标题", "老王 <wang@example.cn>")


def test_read_rfc2231_and_rfc2047_attachment_names() -> None:
    names = [(a.filename, a.content_type) for a in load("rfc2231.eml").attachments]
    assert names == [
        ("合同.pdf", "application/pdf"),
        ("季度报告.xlsx", "application/vnd.ms-excel"),  # gb2312 label, continuations
        ("照片.png", "image/png"),  # RFC 2047 inside a quoted name= (GBK)
        ("../../../etc/cron.d/evil.sh", "application/x-sh"),
    ]


def test_save_path_traversal_name_is_neutralised() -> None:
    assert safe_filename("../../../etc/cron.d/evil.sh") == "evil.sh"
    assert safe_filename("..\\..\\windows\\system32\\x.dll") == "x.dll"
    assert safe_filename("..") == "attachment"
    assert safe_filename(".bashrc") == "bashrc"
    assert safe_filename("con.txt") == "_con.txt"
    assert safe_filename("a\x1b[2Jb.txt") == "a_[2Jb.txt"
    long = safe_filename("报" * 300 + ".pdf")
    assert long.endswith(".pdf") and len(long.encode()) <= 200


def test_read_html_only_mail_becomes_text() -> None:
    msg = load("html_only.eml")
    assert msg.body_type == "text/html"
    assert msg.body == ("今日要闻\n\n第一段 &<内容>\n\n• 条目一\n• 条目二\n\n"
                        "详情见这里 <https://example.cn/a>。\n谢谢\n")
    assert "alert" not in msg.body and "ignored" not in msg.body


def test_read_multipart_alternative_prefers_plain() -> None:
    msg = load("alternative.eml")
    assert (msg.body, msg.body_type, msg.attachments) == ("纯文本版本", "text/plain", [])


def test_read_nested_multipart_finds_body_and_attachments() -> None:
    msg = load("nested.eml")
    assert msg.body == "嵌套的正文\n"
    assert [(a.filename, a.content_type) for a in msg.attachments] == [
        ("part-1.gif", "image/gif"), ("data.csv", "text/csv"), ("part-3.eml", "message/rfc822")]


def test_read_no_charset_is_detected() -> None:
    msg = load("no_charset.eml")
    assert msg.body.startswith("没有声明字符集的邮件正文。")
    assert msg.charset_note == "charset declared none, detected gb18030"


def test_read_multipart_without_boundary_shows_text() -> None:
    msg = load("broken_mime.eml")
    assert msg.body == "This body has no boundary at all.\nStill readable.\n"
    assert "NoBoundaryInMultipartDefect" in msg.defects


def test_read_bad_base64_and_missing_close_boundary() -> None:
    msg = load("broken_base64.eml")
    assert msg.body == "能读出来"
    assert "CloseBoundaryNotFoundDefect" in msg.defects


def test_read_control_characters_in_headers_are_neutralised() -> None:
    raw = b"Subject: =?utf-8?Q?evil=1B]0;pwned=07title?=\r\n\r\nbody\x1b[31m red\r\n"
    msg = render(parse_bytes(raw))
    assert "\x1b" not in msg.subject and "\x07" not in msg.subject
    assert "\x1b" not in msg.body


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.eml")))
def test_read_corpus_json_is_serialisable(name: str) -> None:
    import json
    data = json.loads(json.dumps(load(name).to_json(), ensure_ascii=False))
    assert set(data) >= {"subject", "from", "body", "attachments", "defects"}

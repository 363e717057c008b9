"""Messages that used to come out wrong, built byte for byte and read through real servers.

* A message that is only an attachment (single part ``application/pdf``,
  ``Content-Disposition: attachment``, RFC 2231 UTF-8 file name, a PDF full
  of ESC and C1 bytes): headers, a one-line "no text part" notice and the
  attachment list -- the binary never reaches the terminal -- and ``save``
  writes it.
* A multipart whose attachment name is raw GBK bytes in both ``name=`` and
  ``filename=`` (no RFC 2047/2231), with a character outside GB 2312.
* Raw GBK in Subject and From display name, in a message that declares
  UTF-8 for its body (so only detection over the headers can find GBK).

Each is checked through ``list`` and ``read`` (text and ``--json``) against
mailbag and Dovecot; no output may contain U+FFFD, ESC or a C1 control.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from mailbag.cli import mail_cmd
from mailbag.client.charsets import HeaderHints, decode_header_bytes
from mailbag.client.headers import printable
from mailbag.client.render import NO_TEXT_NOTICE, parse_bytes, render
from tests.client.conftest import Result, Run
from tests.client.pop3servers import Target

PDF_NAME = "合同草案 v2.pdf"
PDF = (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
       b"\x00\x1b[2J\x1b]0;pwned\x07\x9b31m\x85\x90\x9c\r\ntrailer\n%%EOF\n")


def b64_lines(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"\r\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + b"\r\n"


PDF_ONLY = (
    b"From: Zhang San <zhang@example.cn>\r\n"
    b"To: me@example.cn\r\n"
    b"Subject: =?UTF-8?B?5ZCI5ZCM6I2J5qGI?=\r\n"  # 合同草案
    b"Date: Tue, 05 Mar 2024 09:30:00 +0800\r\n"
    b"Message-ID: <pdf-only@example.cn>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: application/pdf;\r\n"
    b" name*=UTF-8''%E5%90%88%E5%90%8C%E8%8D%89%E6%A1%88%20v2.pdf\r\n"
    b"Content-Disposition: attachment;\r\n"
    b" filename*=UTF-8''%E5%90%88%E5%90%8C%E8%8D%89%E6%A1%88%20v2.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + b64_lines(PDF)
)

BINARY_PDF = PDF_ONLY.replace(b"Content-Transfer-Encoding: base64\r\n\r\n" + b64_lines(PDF),
                              b"Content-Transfer-Encoding: binary\r\n\r\n" + PDF)

XLS_NAME = "镕基2024年第三季度报表.xls"  # 镕 is GBK/GB18030 but not GB 2312
XLS = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256))
GBK_ATTACHMENT = (
    b"From: Wang <wang@example.cn>\r\n"
    b"To: me@example.cn\r\n"
    b"Subject: =?GB2312?B?ZwS2yLGose0=?=\r\n".replace(
        b"ZwS2yLGose0=", base64.b64encode("季度报表".encode("gb2312"))) +
    b"Date: Wed, 06 Mar 2024 10:00:00 +0800\r\n"
    b"Message-ID: <gbk-attachment@example.cn>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"----=_Part_0_1\"\r\n"
    b"\r\n"
    b"------=_Part_0_1\r\n"
    b"Content-Type: text/plain; charset=\"gb2312\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + b64_lines("请查收附件中的季度报表。\r\n".encode("gb2312")) +
    b"------=_Part_0_1\r\n"
    b"Content-Type: application/vnd.ms-excel; name=\"" + XLS_NAME.encode("gbk") + b"\"\r\n"
    b"Content-Disposition: attachment; filename=\"" + XLS_NAME.encode("gbk") + b"\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + b64_lines(XLS) +
    b"------=_Part_0_1--\r\n"
)

GBK_SUBJECT = "关于下周会议的通知"
GBK_NAME = "李四"
GBK_HEADERS = (
    b"From: " + GBK_NAME.encode("gbk") + b" <lisi@example.cn>\r\n"
    b"To: me@example.cn\r\n"
    b"Subject: " + GBK_SUBJECT.encode("gbk") + b"\r\n"
    b"Date: Thu, 07 Mar 2024 11:00:00 +0800\r\n"
    b"Message-ID: <gbk-headers@example.cn>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + "会议改到周三下午三点。\r\n".encode()
)

_BAD = re.compile("[\ufffd\x1b\x80-\x9f]")


def clean(result: Result) -> str:
    """The output, asserted free of U+FFFD, ESC and C1 controls."""
    assert result.code == 0, result.err
    text = result.raw.decode("utf-8")  # strict: real UTF-8 only
    assert not _BAD.search(text), _BAD.findall(text)
    assert not _BAD.search(result.err)
    return text


# -- the decoders alone --------------------------------------------------------------


def test_read_pdf_only_renders_notice_and_attachment() -> None:
    msg = render(parse_bytes(PDF_ONLY))
    assert msg.body == "" and msg.notice == NO_TEXT_NOTICE
    [att] = msg.attachments
    assert (att.filename, att.content_type, att.size) == (PDF_NAME, "application/pdf", len(PDF))
    assert att.payload() == PDF


def test_read_gbk_attachment_name_in_name_and_filename() -> None:
    msg = render(parse_bytes(GBK_ATTACHMENT))
    assert msg.subject == "季度报表" and msg.body == "请查收附件中的季度报表。\n"
    [att] = msg.attachments
    assert att.filename == XLS_NAME and att.payload() == XLS
    # name= alone (no Content-Disposition) reads the same.
    only_name = GBK_ATTACHMENT.replace(b"Content-Disposition: attachment; filename=\"" +
                                       XLS_NAME.encode("gbk") + b"\"\r\n", b"")
    assert render(parse_bytes(only_name)).attachments[0].filename == XLS_NAME


def test_read_raw_gbk_subject_and_display_name() -> None:
    msg = render(parse_bytes(GBK_HEADERS))
    assert msg.subject == GBK_SUBJECT
    assert msg.sender == f"{GBK_NAME} <lisi@example.cn>"


def test_read_header_bytes_order_utf8_declared_detected() -> None:
    # UTF-8 first, then declared labels (GBK read as GB18030), then detection on the sample.
    assert decode_header_bytes("中文".encode()).used == "utf-8"
    decoded = decode_header_bytes("镕".encode("gb18030"), HeaderHints(("us-ascii", "gb2312")))
    assert (decoded.text, decoded.used) == ("镕", "gb18030")
    sample = b" ".join(t.encode("gbk") for t in (GBK_SUBJECT, GBK_NAME))
    decoded = decode_header_bytes(GBK_NAME.encode("gbk"), HeaderHints(("utf-8",), sample))
    assert decoded.text == GBK_NAME


def test_read_header_bytes_detection_stays_among_mail_charsets() -> None:
    # Left free, charset-normalizer reads these bytes as UTF-16-LE ("ﱍ汬牥").
    assert decode_header_bytes("Müller".encode("cp1252")).text == "Müller"


def test_read_controls_become_pictures_not_escapes() -> None:
    assert printable("a\x1b[2Jb\x07c\x7fd\x9be\tf\n") == "a␛[2Jb␇c␡d\ufffde\tf\n"


def test_read_8bit_binary_single_part_never_reaches_body() -> None:
    msg = render(parse_bytes(BINARY_PDF))
    assert msg.body == "" and msg.attachments[0].filename == PDF_NAME


# -- end to end, mailbag and Dovecot ----------------------------------------------------


def test_list_and_read_pdf_only_message(pop3: Target, run_cli: Run, tmp_path: Path) -> None:
    pop3.deliver(PDF_ONLY)
    listing = clean(run_cli(pop3, "list"))
    row = next(line for line in listing.splitlines() if "合同草案" in line)
    assert "Zhang San" in row and row.rstrip().endswith("+")
    out = clean(run_cli(pop3, "read", "1"))
    assert "Subject: 合同草案" in out and NO_TEXT_NOTICE in out
    assert PDF_NAME in out and "application/pdf" in out and "1 attachment(s)" in out
    assert "%PDF" not in out and "trailer" not in out  # the binary is not printed
    data = json.loads(clean(run_cli(pop3, "read", "1", "--json")))
    assert data["body"] == "" and data["notice"] == NO_TEXT_NOTICE
    assert data["attachments"] == [{"index": 1, "filename": PDF_NAME,
                                    "content_type": "application/pdf", "size": len(PDF)}]
    saved = clean(run_cli(pop3, "save", "1", "--to", str(tmp_path / "out")))
    assert saved.strip().endswith(PDF_NAME)
    assert (tmp_path / "out" / PDF_NAME).read_bytes() == PDF


def test_list_and_read_gbk_attachment_name(pop3: Target, run_cli: Run, tmp_path: Path) -> None:
    pop3.deliver(GBK_ATTACHMENT)
    listing = clean(run_cli(pop3, "list"))
    assert any("季度报表" in line and line.rstrip().endswith("+") for line in listing.splitlines())
    out = clean(run_cli(pop3, "read", "1"))
    assert XLS_NAME in out and "请查收附件中的季度报表。" in out
    data = json.loads(clean(run_cli(pop3, "read", "1", "--json")))
    assert [a["filename"] for a in data["attachments"]] == [XLS_NAME]
    clean(run_cli(pop3, "save", "1", "--to", str(tmp_path)))
    assert (tmp_path / XLS_NAME).read_bytes() == XLS


def test_list_and_read_raw_gbk_subject_and_from(pop3: Target, run_cli: Run) -> None:
    pop3.deliver(GBK_HEADERS)
    listing = clean(run_cli(pop3, "list"))
    row = next(line for line in listing.splitlines() if GBK_SUBJECT in line)
    assert GBK_NAME in row
    data = json.loads(clean(run_cli(pop3, "list", "--json")))
    assert data["messages"][0]["subject"] == GBK_SUBJECT
    assert data["messages"][0]["from"] == {"name": GBK_NAME, "address": "lisi@example.cn"}
    out = clean(run_cli(pop3, "read", "1"))
    assert f"Subject: {GBK_SUBJECT}" in out and f"{GBK_NAME} <lisi@example.cn>" in out
    assert "会议改到周三下午三点。" in out


@pytest.mark.parametrize(("raw", "on_terminal"), [
    (PDF_ONLY, True), (GBK_ATTACHMENT, True), (GBK_HEADERS, True), (BINARY_PDF, False),
], ids=["pdf-base64", "gbk-attachment", "gbk-headers", "pdf-binary"])
def test_read_raw_refuses_binary_on_a_terminal_only(raw: bytes, on_terminal: bool, pop3: Target,
                                                    run_cli: Run,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pop3.deliver(raw)
    piped = run_cli(pop3, "read", "1", "--raw").raw  # a pipe gets the bytes as sent
    # (POP3 is CRLF-framed: servers send the binary variant's bare LFs as CRLF)
    assert piped == raw if on_terminal else piped.replace(b"\r\n", b"\n") == raw.replace(
        b"\r\n", b"\n")
    monkeypatch.setattr(mail_cmd, "_stdout_is_terminal", lambda: True)
    result = run_cli(pop3, "read", "1", "--raw")
    if on_terminal:
        assert result.raw == raw  # clean text (base64, GBK) still prints
    else:
        assert result.code != 0 and result.raw == b"" and "> message.eml" in result.err
        assert "\x1b" not in result.err

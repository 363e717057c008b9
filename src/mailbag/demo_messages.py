"""Sample messages for ``mailbag demo``: the cases the seed document's author met.

One plain English message, one GBK-encoded Chinese message with an RFC 2047
subject (what came out garbled over telnet), one multipart message with an
attachment, and one whose body lines start with "." (to show dot-stuffing).
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid


def _gbk_word(text: str) -> str:
    """An RFC 2047 B-encoded word in GBK, as Chinese providers write them."""
    return "=?gbk?B?" + base64.b64encode(text.encode("gbk")).decode("ascii") + "?="


def _base(subject: str, sender: str, when: datetime) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "demo@example.org"
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = make_msgid(domain="demo.mailbag.invalid")
    msg["Subject"] = subject
    return msg


def sample_messages() -> list[bytes]:
    """Return the demo messages as raw bytes with LF line endings (as Maildir stores them)."""
    cst = timezone(timedelta(hours=8))
    start = datetime(2008, 6, 14, 2, 23, 25, tzinfo=cst)

    plain = _base("test mail", "Teacher <teacher@example.org>", start)
    plain.set_content("Hi, just a test.\n")

    # GBK body and an RFC 2047 B-encoded GBK subject, built by hand so the
    # bytes are exactly what Chinese mail providers send.
    subject = _gbk_word("测试邮件：中文")
    body = "你好！\n这是一封用 GBK 编码的中文邮件。\nPOP3 客户端应当正确显示它。\n"
    chinese = (
        f"From: {_gbk_word('张老师')} <zhang@example.cn>\n"
        "To: demo@example.org\n"
        f"Date: {format_datetime(start + timedelta(minutes=5))}\n"
        f"Subject: {subject}\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=gbk\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
    ).encode("ascii") + body.encode("gbk")

    multipart = _base(
        "Report with attachment", "Alice <alice@example.org>", start + timedelta(minutes=10)
    )
    multipart.set_content("The report is attached.\n")
    multipart.add_attachment(
        b"name,count\nmessages,4\n", maintype="text", subtype="csv", filename="report.csv"
    )

    dots = _base("Lines starting with dots", "Bob <bob@example.org>", start + timedelta(minutes=15))
    dots.set_content(".hidden line one\n..two dots\n.\nthe line above is a single dot\n")

    return [
        plain.as_bytes(),
        chinese,
        multipart.as_bytes(),
        dots.as_bytes(),
    ]

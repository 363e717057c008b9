"""A raw LMTP test client that reads one DATA reply per accepted recipient.

Python's ``smtplib.LMTP`` reads a single reply after DATA (CPython
bpo-32803), which hides exactly the behaviour LMTP exists for (RFC 2033
section 4.2).  This client pipelines the envelope (RFC 2920), dot-stuffs the
data itself (``mailbag.client.dotstuff.stuff``, the same rule as POP3) and
returns every reply, so tests can assert per-recipient outcomes.  The tests
at the bottom check the client against the server.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from mailbag.client.dotstuff import stuff
from tests.conftest import MailbagServer
from tests.net.pop3raw import RawLines


@dataclass
class Transaction:
    """Every reply of one MAIL..DATA transaction."""

    mail: tuple[int, str]
    rcpt: list[tuple[int, str]]
    data: tuple[int, str]
    per_recipient: list[tuple[int, str]] = field(default_factory=list)


class LmtpClient(RawLines):
    """Speak LMTP by hand over TCP or a Unix socket."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, unix: str | None = None,
        timeout: float = 20,
    ) -> None:
        if unix is not None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            sock.connect(unix)
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
        super().__init__(sock)
        self.greeting = self.reply()

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: code and the text lines joined by newlines."""
        texts = []
        while True:
            line = self.line()
            texts.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(texts)

    def cmd(self, text: str) -> tuple[int, str]:
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def lhlo(self, name: str = "client.test") -> tuple[int, str]:
        return self.cmd(f"LHLO {name}")

    def transaction(
        self, sender: str, recipients: list[str], message: bytes, *, params: str = ""
    ) -> Transaction:
        """Pipeline MAIL, RCPTs and DATA; send the data; read one reply per accepted RCPT."""
        envelope = f"MAIL FROM:<{sender}>{' ' + params if params else ''}\r\n"
        envelope += "".join(f"RCPT TO:<{r}>\r\n" for r in recipients) + "DATA\r\n"
        self.send(envelope.encode())
        mail = self.reply()
        rcpt = [self.reply() for _ in recipients]
        data = self.reply()
        result = Transaction(mail, rcpt, data)
        if data[0] == 354:
            self.send(stuff(message))
            accepted = sum(1 for code, _ in rcpt if code // 100 == 2)
            result.per_recipient = [self.reply() for _ in range(accepted)]
        return result


def test_lhlo_client_sees_extensions(mailbag_server: MailbagServer) -> None:
    """RFC 2033 section 4.1: LHLO answers like EHLO, listing extensions."""
    client = LmtpClient(port=mailbag_server.lmtp_port)
    assert client.greeting[0] == 220
    code, text = client.lhlo()
    assert code == 250
    for keyword in ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SIZE"):
        assert keyword in text
    assert client.cmd("QUIT")[0] == 221
    client.close()


def test_data_client_reads_one_reply_per_recipient(mailbag_server: MailbagServer) -> None:
    """RFC 2033 section 4.2: two accepted recipients, two replies after the dot."""
    mailbag_server.add_user("bob", "bob")
    client = LmtpClient(port=mailbag_server.lmtp_port)
    client.lhlo()
    t = client.transaction("a@x.test", ["demo", "bob"], b"Subject: two\r\n\r\nhi\r\n")
    assert [c for c, _ in t.rcpt] == [250, 250]
    assert [c for c, _ in t.per_recipient] == [250, 250]
    assert client.cmd("NOOP")[0] == 250  # nothing left unread: the stream is in sync
    client.close()

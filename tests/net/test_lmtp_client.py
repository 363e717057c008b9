"""A raw LMTP test client that reads one DATA reply per accepted recipient.

Python's ``smtplib.LMTP`` reads a single reply after DATA (CPython
bpo-32803), which hides exactly the behaviour LMTP exists for (RFC 2033
section 4.2).  This client pipelines the envelope (RFC 2920), dot-stuffs the
data itself and returns every reply, so tests can assert per-recipient
outcomes.  The tests at the bottom check the client against the server.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from tests.conftest import MailbagServer


@dataclass
class Transaction:
    """Every reply of one MAIL..DATA transaction."""

    mail: tuple[int, str]
    rcpt: list[tuple[int, str]]
    data: tuple[int, str]
    per_recipient: list[tuple[int, str]] = field(default_factory=list)


def stuff(message: bytes) -> bytes:
    """Dot-stuff CRLF text and append the terminator (RFC 5321 section 4.5.2)."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + b".\r\n"


class LmtpClient:
    """Speak LMTP by hand over TCP or a Unix socket."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, unix: str | None = None,
        timeout: float = 20,
    ) -> None:
        if unix is not None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(unix)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffer={self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

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

    def close(self) -> None:
        self.sock.close()


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

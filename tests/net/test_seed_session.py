"""The seed document's telnet session, replayed line for line against a real server."""

from __future__ import annotations

from mailbag.demo_messages import sample_messages
from mailbag.wireform import to_wire
from tests.conftest import MailbagServer
from tests.net.pop3raw import RawPop3, unstuff


def test_seed_transcript_lowercase(mailbag_server: MailbagServer) -> None:
    messages = sample_messages()
    for message in messages:
        mailbag_server.deliver(message)
    sizes = [len(to_wire(m)) for m in messages]

    c = RawPop3(mailbag_server.host, mailbag_server.port)
    assert c.greeting.startswith(b"+OK ")
    assert c.cmd("user demo") == b"+OK"
    assert c.cmd("pass demo").startswith(b"+OK Logged in, 4 messages")
    assert c.cmd("stat") == f"+OK 4 {sum(sizes)}".encode()
    c.send(b"list\r\n")
    listing = c.multiline()
    assert listing == b"".join(f"{i} {s}\r\n".encode() for i, s in enumerate(sizes, 1))
    c.send(b"top 1\r\n")  # as typed in the seed: no line count
    header = unstuff(c.multiline())
    assert header.endswith(b"\r\n\r\n") and b"Subject: test mail" in header
    assert b"Hi, just a test." not in header
    c.send(b"retr 1\r\n")
    body = unstuff(c.multiline())
    assert body == to_wire(messages[0])
    assert len(body) == sizes[0]
    assert c.cmd("dele 1").startswith(b"+OK")
    assert c.cmd("quit").startswith(b"+OK")
    assert c.closed()

    again = RawPop3(mailbag_server.host, mailbag_server.port)
    again.cmd("user demo")
    assert again.cmd("pass demo").startswith(b"+OK Logged in, 3 messages")
    assert again.cmd("stat") == f"+OK 3 {sum(sizes[1:])}".encode()
    again.cmd("quit")


def test_retr_dot_lines_byte_exact(mailbag_server: MailbagServer) -> None:
    message = sample_messages()[3]
    mailbag_server.deliver(message)
    c = RawPop3(mailbag_server.host, mailbag_server.port)
    c.cmd("USER demo")
    c.cmd("PASS demo")
    c.send(b"RETR 1\r\n")
    raw = c.multiline()
    assert b"\r\n...hidden line one" not in raw  # one stuffing dot, not two
    assert b"\r\n..hidden line one\r\n" in raw and b"\r\n..\r\n" in raw
    assert unstuff(raw) == to_wire(message)
    c.cmd("QUIT")

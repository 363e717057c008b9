"""Real clients, run for real against a real server: Python's poplib and curl."""

from __future__ import annotations

import poplib
import shutil
import subprocess

import pytest

from mailbag.wireform import to_wire
from tests.conftest import MailbagServer

GBK = (
    b"Subject: =?gbk?B?suLK1A==?=\nContent-Type: text/plain; charset=gbk\n\n"
    + "中文邮件正文，GBK 编码。\n".encode("gbk")
)
UTF8 = "Subject: 你好\nContent-Type: text/plain; charset=utf-8\n\n你好，世界 🌏\n".encode()
EIGHT_BIT = b"Subject: bytes\n\n" + bytes(range(256)).replace(b"\n", b"") + b"\n"
NO_NEWLINE = b"Subject: edge\n\nlast line without newline"
CRLF_STORED = b"Subject: crlf\r\n\r\nalready\r\n.crlf\r\n"


def poplib_login(server: MailbagServer) -> poplib.POP3:
    client = poplib.POP3(server.host, server.port, timeout=10)
    client.user(server.user)
    client.pass_(server.password)
    return client


@pytest.mark.parametrize(
    "message", [GBK, UTF8, EIGHT_BIT, NO_NEWLINE, CRLF_STORED],
    ids=["gbk", "utf8", "8bit", "no-newline", "crlf"],
)
def test_retr_poplib_byte_exact(mailbag_server: MailbagServer, message: bytes) -> None:
    mailbag_server.deliver(message)
    client = poplib_login(mailbag_server)
    count, octets = client.stat()
    assert (count, octets) == (1, len(to_wire(message)))
    _, lines, _size = client.retr(1)
    # poplib strips the stuffing dot and the line ends; rebuild the wire form.
    assert b"\r\n".join(lines) + b"\r\n" == to_wire(message)
    assert client.list(1).split()[2] == str(len(to_wire(message))).encode()
    client.quit()


def test_retr_10_mib_message_byte_exact(mailbag_server: MailbagServer) -> None:
    line = b"0123456789abcdef" * 4 + b"\n"
    message = b"Subject: big\n\n" + line * (10 * 1024 * 1024 // len(line))
    mailbag_server.deliver(message)
    client = poplib_login(mailbag_server)
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == to_wire(message)
    client.quit()


def test_uidl_poplib_stable_across_sessions_and_deletions(mailbag_server: MailbagServer) -> None:
    for i in range(3):
        mailbag_server.deliver(b"Subject: %d\n\nbody\n" % i)
    client = poplib_login(mailbag_server)
    first = client.uidl()[1]
    uids = [line.split()[1] for line in first]
    assert len(set(uids)) == 3
    assert all(1 <= len(u) <= 70 and all(0x21 <= c <= 0x7E for c in u) for u in uids)
    client.dele(1)
    client.quit()
    client = poplib_login(mailbag_server)
    assert [line.split()[1] for line in client.uidl()[1]] == uids[1:]
    client.quit()
    mailbag_server.stop()
    mailbag_server.start()
    client = poplib_login(mailbag_server)
    assert [line.split()[1] for line in client.uidl()[1]] == uids[1:]
    client.quit()


def test_top_poplib(mailbag_server: MailbagServer) -> None:
    mailbag_server.deliver(b"Subject: t\nX: y\n\nl1\nl2\nl3\n")
    client = poplib_login(mailbag_server)
    assert client.top(1, 0)[1] == [b"Subject: t", b"X: y", b""]
    assert client.top(1, 2)[1] == [b"Subject: t", b"X: y", b"", b"l1", b"l2"]
    client.quit()


def test_apop_poplib(mailbag_server: MailbagServer) -> None:
    # RFC 1939 section 7: APOP with the greeting's timestamp.
    mailbag_server.deliver(b"Subject: a\n\nb\n")
    client = poplib.POP3(mailbag_server.host, mailbag_server.port, timeout=10)
    assert client.apop("demo", "demo").startswith(b"+OK")
    assert client.stat()[0] == 1
    client.quit()


def test_apop_without_secret_fails_like_wrong_password(mailbag_server: MailbagServer) -> None:
    mailbag_server.add_user("noapop", "secret")
    client = poplib.POP3(mailbag_server.host, mailbag_server.port, timeout=10)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.apop("noapop", "secret")
    client.quit()


def test_capa_poplib(mailbag_server: MailbagServer) -> None:
    client = poplib.POP3(mailbag_server.host, mailbag_server.port, timeout=10)
    caps = client.capa()
    for cap in ("TOP", "UIDL", "USER", "RESP-CODES", "PIPELINING", "IMPLEMENTATION"):
        assert cap in caps
    client.quit()


curl = shutil.which("curl")
needs_curl = pytest.mark.skipif(curl is None, reason="curl not installed (.ci/run installs it)")


def run_curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert curl is not None
    return subprocess.run([curl, "-sS", "--max-time", "20", *args], capture_output=True,
                          check=False, timeout=30)


@needs_curl
def test_curl_retr_list_uidl_dele(mailbag_server: MailbagServer) -> None:
    messages = [GBK, b"Subject: second\n\n.dot line\nend\n"]
    for m in messages:
        mailbag_server.deliver(m)
    base = f"pop3://demo:demo@{mailbag_server.host}:{mailbag_server.port}"
    listing = run_curl(base + "/")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == [
        f"{i} {len(to_wire(m))}".encode() for i, m in enumerate(messages, 1)
    ]
    got = run_curl(base + "/2")
    assert got.returncode == 0 and got.stdout == to_wire(messages[1])
    got = run_curl(base + "/1")
    assert got.stdout == to_wire(messages[0])
    uidl = run_curl("-X", "UIDL", base + "/")
    assert uidl.returncode == 0 and len(uidl.stdout.splitlines()) == 2
    dele = run_curl("-X", "DELE", "-I", base + "/1")
    assert dele.returncode == 0, dele.stderr
    listing = run_curl(base + "/")
    # A new session numbers from 1 again: the old message 2 is now message 1.
    assert listing.stdout.splitlines() == [b"1 " + str(len(to_wire(messages[1]))).encode()]


@needs_curl
def test_curl_wrong_password_fails(mailbag_server: MailbagServer) -> None:
    result = run_curl(f"pop3://demo:nope@{mailbag_server.host}:{mailbag_server.port}/")
    assert result.returncode == 67  # CURLE_LOGIN_DENIED

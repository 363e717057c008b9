"""LMTP for real: a live ``mailbag serve`` on loopback, real clients, POP3 to read back.

The path under test is the issue's: an MTA hands mail over LMTP (RFC 2033),
and a POP3 client collects it byte for byte.  ``swaks`` is the independent
client; ``LmtpClient`` (test_lmtp_client.py) reads one DATA reply per
recipient, which ``smtplib.LMTP`` cannot (bpo-32803).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailbag.auth.users import UsersFile
from tests.conftest import MailbagServer, make_home
from tests.net.pop3raw import RawPop3, unstuff
from tests.net.test_lmtp_client import LmtpClient

SWAKS = shutil.which("swaks")


def pop3_messages(server: MailbagServer, user: str = "demo", password: str = "demo") -> list[bytes]:
    """Every message of ``user`` as RETR sends it (unstuffed), checking LIST sizes."""
    c = RawPop3(server.host, server.port)
    assert c.cmd(f"USER {user}") == b"+OK"
    assert c.cmd(f"PASS {password}").startswith(b"+OK")
    c.send(b"LIST\r\n")
    sizes = [int(line.split()[1]) for line in c.multiline().split(b"\r\n") if line]
    out = []
    for n, size in enumerate(sizes, 1):
        c.send(f"RETR {n}\r\n".encode())
        body = unstuff(c.multiline())
        assert len(body) == size, "LIST size must equal the octets RETR sends (RFC 1939)"
        out.append(body)
    c.cmd("QUIT")
    c.close()
    return out


def split_trace(stored: bytes) -> tuple[list[bytes], bytes]:
    """Split off the trace headers we add (Return-Path, Delivered-To, folded Received)."""
    lines = stored.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path: <"), lines[0]
    assert lines[1].startswith(b"Delivered-To: "), lines[1]
    assert lines[2].startswith(b"Received: from "), lines[2]
    i = 3
    while lines[i].startswith(b"\t"):
        i += 1
    return lines[:i], b"\r\n".join(lines[i:])


def connect(server: MailbagServer) -> LmtpClient:
    client = LmtpClient(port=server.lmtp_port)
    assert client.lhlo()[0] == 250
    return client


@pytest.mark.skipif(SWAKS is None, reason="swaks not installed (Debian package swaks)")
def test_swaks_lmtp_delivery_retrieved_over_pop3(mailbag_server: MailbagServer) -> None:
    """RFC 2033 with an independent client: swaks --protocol LMTP, then POP3 RETR."""
    message = b"Subject: from swaks\r\n\r\nHello over LMTP.\r\n.leading dot\r\n"
    assert SWAKS is not None
    result = subprocess.run(
        [SWAKS, "--protocol", "LMTP", "--server", f"127.0.0.1:{mailbag_server.lmtp_port}",
         "--from", "sender@example.org", "--to", "demo", "--data", "-", "--timeout", "20"],
        input=message, capture_output=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"<-  250 2.0.0 <demo> Saved as " in result.stdout
    [stored] = pop3_messages(mailbag_server)
    trace, rest = split_trace(stored)
    assert trace[0] == b"Return-Path: <sender@example.org>"
    assert trace[1] == b"Delivered-To: demo"
    assert rest == message + b"\r\n"  # swaks ends --data with one more CRLF of its own


@pytest.mark.skipif(SWAKS is None, reason="swaks not installed (Debian package swaks)")
def test_swaks_lmtp_multiple_recipients_each_answered(mailbag_server: MailbagServer) -> None:
    """RFC 2033 section 4.2 seen by swaks: one reply per recipient after the dot."""
    mailbag_server.add_user("bob", "bob")
    assert SWAKS is not None
    result = subprocess.run(
        [SWAKS, "--protocol", "LMTP", "--server", f"127.0.0.1:{mailbag_server.lmtp_port}",
         "--from", "s@example.org", "--to", "demo,nobody,bob", "--timeout", "20"],
        capture_output=True, check=False, timeout=60,
    )
    out = result.stdout.decode()
    assert "550 5.1.1 <nobody> User unknown" in out
    assert "250 2.0.0 <demo> Saved as" in out and "250 2.0.0 <bob> Saved as" in out
    assert len(pop3_messages(mailbag_server)) == 1
    assert len(pop3_messages(mailbag_server, "bob", "bob")) == 1


def test_data_multi_recipient_per_recipient_results(mailbag_server: MailbagServer) -> None:
    """RFC 2033 section 4.2: 250, 552 5.2.2 (over quota), 250; unknown refused at RCPT."""
    for name in ("alice", "bob", "carol"):
        mailbag_server.add_user(name, name)
    UsersFile(mailbag_server.home / "users").set_quota("bob", bytes=100)
    client = connect(mailbag_server)
    body = b"Subject: team\r\n\r\n" + b"x" * 200 + b"\r\n"
    t = client.transaction("boss@example.org", ["alice", "nobody", "bob", "carol"], body)
    assert t.mail[0] == 250
    assert [code for code, _ in t.rcpt] == [250, 550, 250, 250]
    assert t.rcpt[1][1].startswith("5.1.1")  # RFC 3463: bad destination mailbox address
    assert t.data[0] == 354
    assert [code for code, _ in t.per_recipient] == [250, 552, 250]
    assert t.per_recipient[1][1].startswith("5.2.2 <bob> Mailbox full")  # RFC 3463 X.2.2
    client.close()
    assert len(pop3_messages(mailbag_server, "alice", "alice")) == 1
    assert pop3_messages(mailbag_server, "bob", "bob") == []  # refused whole, never truncated
    assert len(pop3_messages(mailbag_server, "carol", "carol")) == 1


def test_data_over_message_count_quota_is_552_5_2_2(mailbag_server: MailbagServer) -> None:
    mailbag_server.add_user("bob", "bob")
    UsersFile(mailbag_server.home / "users").set_quota("bob", messages=2)
    client = connect(mailbag_server)
    codes = [client.transaction("s@x", ["bob"], b"Subject: n\r\n\r\nn\r\n").per_recipient[0]
             for _ in range(3)]
    assert [c for c, _ in codes] == [250, 250, 552]
    assert codes[2][1].startswith("5.2.2")
    client.close()


def test_rcpt_unknown_user_is_550_5_1_1(mailbag_server: MailbagServer) -> None:
    """RFC 3463 X.1.1; DATA after only failed RCPTs is 503 (RFC 2033 section 4.2)."""
    client = connect(mailbag_server)
    t = client.transaction("s@x", ["nobody@example.org"], b"x\r\n")
    assert t.rcpt == [(550, "5.1.1 <nobody@example.org> User unknown")]
    assert t.data[0] == 503
    client.close()


def test_data_storage_failure_is_451_4_3_0(mailbag_server: MailbagServer) -> None:
    """A Maildir that cannot be written is a temporary failure: the MTA retries."""
    mailbag_server.add_user("broken", "broken")
    path = mailbag_server.maildir("broken")
    path.parent.mkdir(parents=True)
    path.write_text("not a directory")  # fails even as root, unlike chmod
    client = connect(mailbag_server)
    t = client.transaction("s@x", ["demo", "broken"], b"Subject: s\r\n\r\nb\r\n")
    assert [c for c, _ in t.per_recipient] == [250, 451]
    assert t.per_recipient[1][1].startswith("4.3.0")
    client.close()


def test_rcpt_same_account_twice_delivered_once(mailbag_server: MailbagServer) -> None:
    """Both RCPTs get a reply (RFC 2033 section 4.2), but the maildrop gets one copy."""
    client = connect(mailbag_server)
    t = client.transaction("s@x", ["demo", "demo"], b"Subject: dup\r\n\r\nb\r\n")
    assert [c for c, _ in t.per_recipient] == [250, 250]
    client.close()
    assert len(pop3_messages(mailbag_server)) == 1


DOTS_AND_8BIT = (
    b"Subject: =?UTF-8?B?5Lit5paH?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b".\r\n..\r\n.hidden\r\n...three\r\n"
    + "中文正文，À bientôt — 再见\r\n".encode()
    + bytes(range(0x80, 0x100)) + b"\r\n"
    + b"line with a lone \r in it\r\n"
    + b"a . in the middle\r\n"
    + b"x" * 5000 + b"\r\n"
    + b".\r\n"
)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 0], ids=["1B", "7B", "4KiB", "whole"])
def test_data_dot_transparency_and_8bit_byte_exact_over_pop3(
    mailbag_server: MailbagServer, chunk: int
) -> None:
    """RFC 5321 section 4.5.2 in, RFC 1939 section 3 out: the same octets, any segmentation."""
    client = connect(mailbag_server)
    client.send(b"MAIL FROM:<s@x> BODY=8BITMIME\r\nRCPT TO:<demo>\r\nDATA\r\n")
    assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
    stuffed = DOTS_AND_8BIT.replace(b"\r\n.", b"\r\n..")
    stuffed = (b"." + stuffed if stuffed.startswith(b".") else stuffed) + b".\r\n"
    step = chunk or len(stuffed)
    for i in range(0, len(stuffed), step):
        client.send(stuffed[i : i + step])
        if chunk == 1 and i % 512 == 0:
            time.sleep(0.001)  # let the server see really small segments
    code, text = client.reply()
    assert code == 250, text
    client.close()
    [stored] = pop3_messages(mailbag_server)
    _, rest = split_trace(stored)
    assert rest == DOTS_AND_8BIT


def test_data_oversize_is_552_5_3_4(mailbag_home: MailbagServer) -> None:
    """RFC 1870: declared SIZE refused at MAIL; undeclared oversize refused after the dot."""
    text = mailbag_home.config.read_text()
    mailbag_home.config.write_text(
        text.replace("max_message_size = 52428800", "max_message_size = 1000")
    )
    mailbag_home.start()
    try:
        client = connect(mailbag_home)
        assert "SIZE 1000" in client.lhlo()[1]
        assert client.cmd("MAIL FROM:<s@x> SIZE=5000")[0] == 552
        big = b"Subject: big\r\n\r\n" + b"y" * 2000 + b"\r\n"
        t = client.transaction("s@x", ["demo"], big)
        assert t.per_recipient == [
            (552, "5.3.4 Message size exceeds fixed maximum message size")
        ]
        small = client.transaction("s@x", ["demo"], b"Subject: ok\r\n\r\nfine\r\n")
        assert small.per_recipient[0][0] == 250  # the connection is still in sync
        client.close()
        assert len(pop3_messages(mailbag_home)) == 1
    finally:
        mailbag_home.stop()


def test_data_during_open_pop3_session_seen_next_session(mailbag_server: MailbagServer) -> None:
    """RFC 1939 section 4: an open session keeps its snapshot; the next one sees the message."""
    pop = RawPop3(mailbag_server.host, mailbag_server.port)
    pop.cmd("USER demo")
    assert pop.cmd("PASS demo").startswith(b"+OK")
    assert pop.cmd("STAT") == b"+OK 0 0"
    client = connect(mailbag_server)
    t = client.transaction("s@x", ["demo"], b"Subject: race\r\n\r\nb\r\n")
    assert t.per_recipient[0][0] == 250  # delivery does not wait for the POP3 lock
    assert pop.cmd("STAT") == b"+OK 0 0"
    pop.cmd("QUIT")
    client.close()
    assert len(pop3_messages(mailbag_server)) == 1


def lmtp_on_unix_socket(server: MailbagServer, sock: Path) -> None:
    """Configure ``server``'s LMTP listener on the Unix socket ``sock``."""
    text = server.config.read_text()
    server.config.write_text(text.replace('socket = ""', f'socket = "{sock}"', 1))


def wait_for_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_lhlo_over_unix_socket(mailbag_home: MailbagServer, tmp_path: Path) -> None:
    """The Postfix ``lmtp:unix:`` transport: LMTP on a Unix-domain socket with a set mode."""
    sock = tmp_path / "lmtp.sock"
    lmtp_on_unix_socket(mailbag_home, sock)
    mailbag_home.start()
    try:
        wait_for_file(sock)
        assert sock.stat().st_mode & 0o777 == 0o660
        client = LmtpClient(unix=str(sock))
        assert client.lhlo()[0] == 250
        t = client.transaction("s@x", ["demo"], b"Subject: unix\r\n\r\nb\r\n")
        assert t.per_recipient[0][0] == 250
        client.close()
        [stored] = pop3_messages(mailbag_home)
        assert b"Received: from client.test\r\n\tby localhost (mailbag) with LMTP" in stored
    finally:
        mailbag_home.stop()
    assert not sock.exists()  # removed on shutdown


def test_unix_socket_in_use_is_refused_and_left_alone(
    mailbag_home: MailbagServer, tmp_path: Path
) -> None:
    """A second server configured with a running one's socket path refuses to start and
    leaves the file alone (removing it would cut the running server off from the MTA)."""
    sock = tmp_path / "lmtp.sock"
    lmtp_on_unix_socket(mailbag_home, sock)
    second = make_home(tmp_path / "second")
    lmtp_on_unix_socket(second, sock)
    mailbag_home.start()
    try:
        wait_for_file(sock)
        result = subprocess.run(
            [sys.executable, "-m", "mailbag", "serve", "-c", str(second.config)],
            capture_output=True, timeout=30, check=False,
        )
        assert result.returncode != 0
        assert b"in use by another process" in result.stderr
        assert sock.is_socket()
        client = LmtpClient(unix=str(sock))  # the first server is still reachable
        assert client.lhlo()[0] == 250
        client.close()
    finally:
        mailbag_home.stop()
    assert not sock.exists()


def test_quit_idle_connection_gets_421_on_shutdown(mailbag_server: MailbagServer) -> None:
    """An idle LMTP connection is told 421 at once on SIGTERM (RFC 5321 section 3.8)."""
    client = connect(mailbag_server)
    started = time.monotonic()
    assert mailbag_server.proc is not None
    mailbag_server.proc.send_signal(signal.SIGTERM)
    code, _ = client.reply()
    assert code == 421
    assert mailbag_server.stop() == 0
    assert time.monotonic() - started < 5  # did not wait out the grace period
    client.close()


def test_data_connection_lost_before_dot_stores_nothing(mailbag_server: MailbagServer) -> None:
    """No final dot, no message (RFC 5321 section 4.1.1.4): the MTA will retry."""
    client = connect(mailbag_server)
    client.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<demo>\r\nDATA\r\n")
    assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
    client.send(b"Subject: cut\r\n\r\n" + b"z" * 100000)
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    time.sleep(0.2)
    assert pop3_messages(mailbag_server) == []

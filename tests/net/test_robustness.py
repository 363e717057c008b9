"""Over real sockets: crashes, shutdowns, concurrency and hostile input lose nothing."""

from __future__ import annotations

import poplib
import signal
import socket
import threading
import time

import pytest

from tests.conftest import MailbagServer
from tests.net.pop3raw import RawPop3


def login(server: MailbagServer) -> RawPop3:
    c = RawPop3(server.host, server.port)
    assert c.cmd("USER demo") == b"+OK"
    assert c.cmd("PASS demo").startswith(b"+OK")
    return c


def count_messages(server: MailbagServer) -> int:
    c = login(server)
    n = int(c.cmd("STAT").split()[1])
    c.cmd("QUIT")
    return n


def test_kill_9_mid_session_loses_and_duplicates_nothing(mailbag_server: MailbagServer) -> None:
    for i in range(5):
        mailbag_server.deliver(b"Subject: %d\n\nbody\n" % i)
    c = login(mailbag_server)
    c.send(b"UIDL\r\n")
    before = c.multiline()
    for n in range(1, 6):
        assert c.cmd(f"DELE {n}").startswith(b"+OK")
    mailbag_server.stop(signal.SIGKILL)
    c.close()
    mailbag_server.start()
    c = login(mailbag_server)
    c.send(b"UIDL\r\n")
    assert c.multiline() == before
    c.cmd("QUIT")


def test_sigterm_cuts_session_without_applying_deletions(mailbag_home: MailbagServer) -> None:
    mailbag_home.config.write_text(
        mailbag_home.config.read_text().replace("shutdown_grace = 10.0", "shutdown_grace = 0.5")
    )
    mailbag_home.start()
    for i in range(3):
        mailbag_home.deliver(b"Subject: %d\n\nbody\n" % i)
    c = login(mailbag_home)
    c.cmd("DELE 1")
    assert mailbag_home.stop(signal.SIGTERM) == 0
    assert c.closed()
    mailbag_home.start()
    try:
        assert count_messages(mailbag_home) == 3
    finally:
        mailbag_home.stop()
    assert "logout" in mailbag_home.log() and "outcome=shutdown" in mailbag_home.log()


def test_concurrent_login_same_maildrop_in_use(mailbag_server: MailbagServer) -> None:
    mailbag_server.deliver(b"Subject: x\n\ny\n")
    first = login(mailbag_server)
    second = RawPop3(mailbag_server.host, mailbag_server.port)
    second.cmd("USER demo")
    assert second.cmd("PASS demo").startswith(b"-ERR [IN-USE]")
    assert first.cmd("STAT") == first.cmd("STAT")  # first session undisturbed
    first.cmd("QUIT")
    second.cmd("USER demo")
    assert second.cmd("PASS demo").startswith(b"+OK")  # lock released at QUIT
    second.cmd("QUIT")


def test_delivery_during_session_appears_only_next_session(mailbag_server: MailbagServer) -> None:
    # RFC 1939 section 4: the maildrop snapshot is fixed for the session.
    mailbag_server.deliver(b"Subject: 1\n\n1\n")
    c = login(mailbag_server)
    mailbag_server.deliver(b"Subject: 2\n\n2\n")
    assert c.cmd("STAT").startswith(b"+OK 1 ")
    c.cmd("QUIT")
    assert count_messages(mailbag_server) == 2


def test_garbage_and_long_lines_do_not_crash(mailbag_server: MailbagServer) -> None:
    c = RawPop3(mailbag_server.host, mailbag_server.port)
    c.send(b"\x00\xff\xfe garbage\r\n")
    assert c.line().startswith(b"-ERR")
    c.send(b"A" * 100_000 + b"\r\n")
    assert c.line() == b"-ERR Line too long."
    c.send(b"STAT:\r\n\r\n")
    assert c.line().startswith(b"-ERR")
    assert c.line().startswith(b"-ERR")
    assert c.cmd("QUIT").startswith(b"+OK")
    # The server still serves others.
    assert count_messages(mailbag_server) == 0


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the server's FIN; a reset (RST) raises ConnectionResetError."""
    data = b""
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_too_many_errors_closes_connection(mailbag_server: MailbagServer) -> None:
    c = RawPop3(mailbag_server.host, mailbag_server.port)
    for _ in range(9):
        assert c.cmd("BOGUS").startswith(b"-ERR")
    assert c.cmd("BOGUS") == b"-ERR Unknown command: BOGUS; too many errors, closing connection."
    assert c.closed()


@pytest.mark.parametrize("pipelined", [b"", b"USER demo\r\n", b"USER demo\r\n" * 3000])
def test_error_limit_is_one_reply_then_clean_close(
    mailbag_server: MailbagServer, pipelined: bytes
) -> None:
    """RFC 1939: one response per command, also for the one that reaches limits.max_errors.

    Read with a raw socket, so no extra line can hide in a buffer: exactly ten
    replies, the last says the connection closes, then FIN (EOF), never a reset,
    even when the client already sent more commands behind the last bad one.
    """
    c = RawPop3(mailbag_server.host, mailbag_server.port)  # has read the greeting
    c.sock.sendall(b"BOGUS\r\n" * 10 + pipelined)
    data = c.buf + read_to_eof(c.sock)  # raises ConnectionResetError on RST
    c.close()
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    assert len(lines) == 11
    assert lines[:9] == [b"-ERR Unknown command: BOGUS"] * 9
    assert lines[9] == b"-ERR Unknown command: BOGUS; too many errors, closing connection."


def test_many_connections_and_one_slow_client(mailbag_server: MailbagServer) -> None:
    socks = [socket.create_connection((mailbag_server.host, mailbag_server.port))
             for _ in range(40)]
    slow = socks[0]
    slow.sendall(b"US")  # never finishes its line
    try:
        assert count_messages(mailbag_server) == 0
    finally:
        for s in socks:
            s.close()


def test_parallel_sessions_different_users(mailbag_server: MailbagServer) -> None:
    names = [f"user{i}" for i in range(6)]
    for name in names:
        mailbag_server.add_user(name, "pw" + name)
        mailbag_server.deliver(b"Subject: for " + name.encode() + b"\n\nhi\n", user=name)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            for _ in range(3):
                client = poplib.POP3(mailbag_server.host, mailbag_server.port, timeout=20)
                client.user(name)
                client.pass_("pw" + name)
                assert client.stat()[0] == 1
                assert b"for " + name.encode() in b"\n".join(client.retr(1)[1])
                client.quit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_log_has_session_events_but_no_secrets(mailbag_server: MailbagServer) -> None:
    c = RawPop3(mailbag_server.host, mailbag_server.port)
    c.cmd("USER demo")
    c.cmd("PASS wrong-secret-123")
    c.cmd("USER demo")
    c.cmd("PASS demo")
    c.cmd("QUIT")
    time.sleep(0.3)
    log = mailbag_server.log()
    assert "login-failed" in log and "reason=\"wrong password\"" in log
    assert " login " in log and "logout" in log
    assert "wrong-secret-123" not in log

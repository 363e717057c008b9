"""Policy on the wire: plaintext refusal, guessing throttle, connection caps, timeouts, logs.

The "untrusted" client connects from 127.0.0.2 (any 127/8 address is local on Linux) while
the config trusts only 127.0.0.1/32 for plaintext authentication.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import MailbagServer
from tests.net.pop3raw import RawPop3
from tests.net.tlshelpers import (
    TlsPop3,
    client_context,
    plain_blob,
    run_curl,
    scram_login,
    set_option,
    wait_until,
)

UNTRUSTED = "127.0.0.2"


@pytest.fixture
def strict_server(mailbag_home: MailbagServer) -> Iterator[MailbagServer]:
    """Plaintext auth trusted from 127.0.0.1 only (Dovecot's disable_plaintext_auth)."""
    set_option(mailbag_home, "auth", "plaintext_networks", '["127.0.0.1/32"]')
    mailbag_home.start()
    try:
        yield mailbag_home
    finally:
        mailbag_home.stop()


def _capa(c: TlsPop3) -> list[bytes]:
    return c.multiline_lines("CAPA")


def test_user_refused_in_clear_from_untrusted_address(strict_server: MailbagServer) -> None:
    # RFC 2595 section 2.2 spirit + RFC 3206 [AUTH]: no password in clear; point to STLS.
    c = TlsPop3(strict_server.host, strict_server.port, source=UNTRUSTED)
    capa = _capa(c)
    assert b"USER" not in capa and b"SASL SCRAM-SHA-256" in capa and b"STLS" in capa
    assert b"UTF8" in capa and b"UTF8 USER" not in capa
    refusal = c.cmd("USER demo")
    assert refusal.startswith(b"-ERR [AUTH]") and b"STLS" in refusal
    assert c.cmd("PASS demo").startswith(b"-ERR [AUTH]")
    assert c.cmd(b"AUTH PLAIN " + plain_blob("demo", "demo")).startswith(b"-ERR [AUTH]")
    assert c.multiline_lines("AUTH") == [b"SCRAM-SHA-256"]
    # After STLS the same commands work (and CAPA now offers them).
    assert c.cmd("STLS").startswith(b"+OK")
    c.starttls(client_context(strict_server.cert))
    capa = _capa(c)
    assert b"USER" in capa and b"SASL SCRAM-SHA-256 PLAIN" in capa and b"STLS" not in capa
    assert c.cmd("USER demo") == b"+OK"
    assert c.cmd("PASS demo").startswith(b"+OK Logged in")
    c.cmd("QUIT")


def test_auth_plain_after_stls_from_untrusted_address(strict_server: MailbagServer) -> None:
    c = TlsPop3(strict_server.host, strict_server.port, source=UNTRUSTED)
    assert c.cmd("STLS").startswith(b"+OK")
    c.starttls(client_context(strict_server.cert))
    assert c.cmd(b"AUTH PLAIN " + plain_blob("demo", "demo")).startswith(b"+OK Logged in")
    c.cmd("QUIT")


def test_auth_scram_in_clear_from_untrusted_address(strict_server: MailbagServer) -> None:
    # SCRAM never reveals the password, so it is not "plaintext authentication".
    c = TlsPop3(strict_server.host, strict_server.port, source=UNTRUSTED)
    reply, _ = scram_login(c, "demo", "demo")
    assert reply.startswith(b"+OK Logged in")
    c.cmd("QUIT")


def test_user_allowed_in_clear_from_trusted_address(strict_server: MailbagServer) -> None:
    # The telnet demo on 127.0.0.1 keeps working.
    c = RawPop3(strict_server.host, strict_server.port)
    assert c.cmd("USER demo") == b"+OK"
    assert c.cmd("PASS demo").startswith(b"+OK")
    c.cmd("QUIT")


def test_user_refused_curl_without_tls_from_untrusted(strict_server: MailbagServer) -> None:
    # A real client from an untrusted address: refused in clear, fine with --ssl-reqd.
    # (carol has no APOP secret: curl would otherwise use APOP, which sends no password.)
    strict_server.add_user("carol", "pw")
    url = f"pop3://127.0.0.1:{strict_server.port}/"
    refused = run_curl("--interface", UNTRUSTED, "-u", "carol:pw", url)
    assert refused.returncode != 0
    ok = run_curl(
        "--interface", UNTRUSTED, "--ssl-reqd", "--cacert", str(strict_server.cert),
        "-u", "carol:pw", url,
    )
    assert ok.returncode == 0, ok.stderr


def _failed_login_seconds(server: MailbagServer, source: str, user: str = "demo") -> float:
    c = TlsPop3(server.host, server.port, source=source)
    assert c.cmd(f"USER {user}") == b"+OK"
    started = time.monotonic()
    assert c.cmd("PASS wrong").startswith(b"-ERR [AUTH]")
    elapsed = time.monotonic() - started
    c.cmd("QUIT")
    return elapsed


def test_pass_failures_grow_the_delay_then_cap(mailbag_server: MailbagServer) -> None:
    # Test config: failure_delay 0.2 s, max_failure_delay 0.5 s.  The n-th failure waits
    # the fixed 0.2 s answer delay plus min(0.5, 0.2 * 2**(n-2)) before the check.
    times = [_failed_login_seconds(mailbag_server, "127.0.0.1") for _ in range(5)]
    assert times[0] < times[3]  # the first failure is not delayed before the check
    assert times[1] >= 0.2 + 0.1 - 0.02
    assert times[3] >= 0.2 + 0.4 - 0.02
    assert times[4] < 0.2 + 0.5 + 0.6  # capped (0.5 s), with slack for a busy machine
    assert "throttled" in mailbag_server.log()


def test_pass_throttle_per_account_spans_addresses(mailbag_server: MailbagServer) -> None:
    for _ in range(3):
        _failed_login_seconds(mailbag_server, "127.0.0.1")
    # A different address guessing the same account waits too ...
    assert _failed_login_seconds(mailbag_server, "127.0.0.3") >= 0.2 + 0.4 - 0.02
    # ... and the real user is never locked out: the right password works, at worst late.
    c = TlsPop3(mailbag_server.host, mailbag_server.port, source="127.0.0.4")
    c.cmd("USER demo")
    started = time.monotonic()
    assert c.cmd("PASS demo").startswith(b"+OK Logged in")
    assert time.monotonic() - started < 0.5 + 0.6  # at most the cap, plus slack
    c.cmd("QUIT")


def test_pass_too_many_failures_closes_connection(mailbag_server: MailbagServer) -> None:
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    for _ in range(3):
        c.cmd("USER demo")
        assert c.cmd("PASS wrong").startswith(b"-ERR [AUTH]")
    assert c.closed()


def _start_quiet(server: MailbagServer) -> None:
    """Start, and wait until the fixture's readiness probe has disconnected (it counts too).

    Held-open test connections would otherwise make the stop wait the full shutdown grace.
    """
    set_option(server, "limits", "shutdown_grace", "0.2")
    server.start()
    assert wait_until(lambda: "logout" in server.log())


def test_connect_per_address_cap(mailbag_home: MailbagServer) -> None:
    # Connection caps are per client address and in total; the refusal is [SYS/TEMP].
    set_option(mailbag_home, "limits", "max_connections_per_ip", "2")
    _start_quiet(mailbag_home)
    try:
        held = [RawPop3(mailbag_home.host, mailbag_home.port) for _ in range(2)]
        third = RawPop3(mailbag_home.host, mailbag_home.port)
        assert third.greeting.startswith(b"-ERR [SYS/TEMP] Too many connections")
        assert third.closed()
        other = TlsPop3(mailbag_home.host, mailbag_home.port, source=UNTRUSTED)
        assert other.greeting.startswith(b"+OK")
        held[0].cmd("QUIT")
        assert wait_until(lambda: RawPop3(mailbag_home.host, mailbag_home.port)
                          .greeting.startswith(b"+OK"))
        assert 'reason="too many connections"' in mailbag_home.log()
    finally:
        mailbag_home.stop()


def test_connect_total_cap(mailbag_home: MailbagServer) -> None:
    set_option(mailbag_home, "limits", "max_connections", "3")
    _start_quiet(mailbag_home)
    try:
        held = [TlsPop3(mailbag_home.host, mailbag_home.port, source=f"127.0.0.{n}")
                for n in (1, 2, 3)]
        extra = TlsPop3(mailbag_home.host, mailbag_home.port, source="127.0.0.9")
        assert extra.greeting.startswith(b"-ERR [SYS/TEMP]")
        assert all(h.greeting.startswith(b"+OK") for h in held)
    finally:
        mailbag_home.stop()


@pytest.fixture
def short_login_server(mailbag_home: MailbagServer) -> Iterator[MailbagServer]:
    set_option(mailbag_home, "limits", "login_timeout", "1.0")
    mailbag_home.start()
    try:
        yield mailbag_home
    finally:
        mailbag_home.stop()


def test_connect_idle_before_login_cut_at_login_timeout(short_login_server: MailbagServer) -> None:
    # Before login the timeout is short (limits.login_timeout); RFC 1939's 10 minutes
    # autologout applies to authenticated sessions.
    c = RawPop3(short_login_server.host, short_login_server.port)
    started = time.monotonic()
    assert c.line() == b"-ERR Autologout; idle for too long."
    assert 0.8 < time.monotonic() - started < 3
    assert c.closed()


def test_connect_slowloris_cannot_extend_login_deadline(short_login_server: MailbagServer) -> None:
    # One byte every 0.2 s: the pre-login deadline is absolute, so activity does not help.
    sock = socket.create_connection((short_login_server.host, short_login_server.port), 5)
    started = time.monotonic()
    sock.recv(512)  # greeting
    closed_at = None
    for _ in range(25):
        try:
            sock.sendall(b"X")
        except OSError:
            closed_at = time.monotonic()
            break
        sock.settimeout(0.2)
        try:
            data = sock.recv(512)
        except TimeoutError:
            continue
        if data == b"" or b"Autologout" in data:
            closed_at = time.monotonic()
            break
    sock.close()
    assert closed_at is not None and closed_at - started < 2.5


def test_connect_after_login_idle_timer_is_the_long_one(short_login_server: MailbagServer) -> None:
    c = RawPop3(short_login_server.host, short_login_server.port)
    c.cmd("USER demo")
    assert c.cmd("PASS demo").startswith(b"+OK")
    time.sleep(1.3)  # longer than login_timeout
    assert c.cmd("NOOP") == b"+OK"
    c.cmd("QUIT")


def test_auth_secrets_never_logged_even_at_debug(mailbag_home: MailbagServer) -> None:
    # DESIGN rule 10: passwords and AUTH data never reach the log; mechanism and reason do.
    set_option(mailbag_home, "log", "level", '"debug"')
    mailbag_home.start()
    try:
        secrets = ["Hunter2-wrong-PASS", "Sasl-PLAIN-wrong-pw", "scram-wrong-pw", "demo-right"]
        mailbag_home.add_user("carol", "demo-right")
        c = RawPop3(mailbag_home.host, mailbag_home.port)
        c.cmd("USER carol")
        c.cmd(f"PASS {secrets[0]}")
        plain = plain_blob("carol", secrets[1])
        c.cmd(b"AUTH PLAIN " + plain)
        c.close()
        c = TlsPop3(mailbag_home.host, mailbag_home.port)
        sent: list[bytes] = []
        reply, _ = scram_login(c, "carol", secrets[2], transcript=sent)
        assert reply.startswith(b"-ERR [AUTH]") and len(sent) == 2
        c.cmd("USER carol")
        assert c.cmd(f"PASS {secrets[3]}").startswith(b"+OK")
        c.cmd("QUIT")
        assert wait_until(lambda: mailbag_home.log().count("logout") >= 3)
        log = mailbag_home.log()
        wire = [plain] + [line.split()[-1] for line in sent]  # base64 as sent
        decoded = [base64.b64decode(w).decode() for w in wire[1:]]  # n=carol,r=..., c=...,p=...
        for secret in [*secrets, *(w.decode() for w in wire), *decoded]:
            assert secret not in log
        proof = decoded[1].rsplit("p=", 1)[1]
        assert proof not in log
        assert "mechanism=PLAIN" in log and "mechanism=SCRAM-SHA-256" in log
        assert 'reason="wrong password"' in log
    finally:
        mailbag_home.stop()

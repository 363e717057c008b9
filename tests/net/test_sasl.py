"""SASL AUTH on the wire (RFC 5034): SCRAM-SHA-256 and PLAIN with real client implementations.

SCRAM is driven by ``scramp``'s client and by mpop (GNU SASL); PLAIN by curl.  None of them
shares code with the server.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.conftest import MailbagServer
from tests.net.tlshelpers import (
    TlsPop3,
    client_context,
    plain_blob,
    run_curl,
    run_mpop,
    scram_login,
)

MESSAGE = b"From: a@example.org\r\nSubject: sasl\r\n\r\nhello over sasl\r\n"


@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "empty-challenge"])
def test_auth_scram_sha_256_scramp_client(mailbag_server: MailbagServer, initial: bool) -> None:
    # RFC 5034 section 4 (initial response optional) + RFC 7677; scramp checks our signature.
    mailbag_server.deliver(MESSAGE)
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    reply, _ = scram_login(c, "demo", "demo", initial=initial)
    assert reply == b"+OK Logged in, 1 messages (%d octets)." % len(MESSAGE)
    assert c.cmd("QUIT").startswith(b"+OK")
    assert "mechanism=SCRAM-SHA-256" in mailbag_server.log()


def test_auth_scram_sha_256_wrong_password(mailbag_server: MailbagServer) -> None:
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    reply, _ = scram_login(c, "demo", "not-the-password")
    assert reply == b"-ERR [AUTH] Authentication failed."
    # The connection stays usable (RFC 5034 section 4: back to AUTHORIZATION).
    reply, _ = scram_login(c, "demo", "demo")
    assert reply.startswith(b"+OK Logged in")
    c.cmd("QUIT")
    assert 'reason="wrong password"' in mailbag_server.log()


def test_auth_scram_sha_256_unknown_user(mailbag_server: MailbagServer) -> None:
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    reply, _ = scram_login(c, "nobody", "x")
    assert reply == b"-ERR [AUTH] Authentication failed."


def test_auth_scram_sha_256_inside_stls(mailbag_server: MailbagServer) -> None:
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("STLS").startswith(b"+OK")
    c.starttls(client_context(mailbag_server.cert))
    reply, _ = scram_login(c, "demo", "demo")
    assert reply.startswith(b"+OK Logged in")
    c.cmd("QUIT")


def test_auth_scram_sha_256_utf8_user_and_password(mailbag_server: MailbagServer) -> None:
    # RFC 6856 + RFC 5802 section 5.1: UTF-8 names and SASLprep'd UTF-8 passwords.
    mailbag_server.add_user("jürgen", "pässwörd")
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    reply, _ = scram_login(c, "jürgen", "pässwörd")
    assert reply.startswith(b"+OK Logged in")
    c.cmd("QUIT")


def test_utf8_then_user_pass_with_utf8_credentials(mailbag_server: MailbagServer) -> None:
    # RFC 6856 section 2: after UTF8, USER and PASS carry UTF-8.
    mailbag_server.add_user("jürgen", "pässwörd")
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("UTF8").startswith(b"+OK")
    assert c.cmd("USER jürgen".encode()).startswith(b"+OK")
    assert c.cmd("PASS pässwörd".encode()).startswith(b"+OK Logged in")
    c.cmd("QUIT")


@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "pop3s"])
def test_auth_scram_sha_256_mpop(
    mailbag_server: MailbagServer, tmp_path: Path, starttls: bool
) -> None:
    # mpop's SCRAM-SHA-256 comes from GNU SASL: an independent client implementation.
    mailbag_server.deliver(MESSAGE)
    port = mailbag_server.port if starttls else mailbag_server.tls_port
    result, maildir = run_mpop(
        tmp_path, port=port, cafile=mailbag_server.cert, starttls=starttls, auth="scram-sha-256"
    )
    assert result.returncode == 0, result.stderr
    assert len(list((maildir / "new").iterdir())) == 1
    assert "mechanism=SCRAM-SHA-256" in mailbag_server.log()


def test_auth_scram_sha_256_mpop_wrong_password(
    mailbag_server: MailbagServer, tmp_path: Path
) -> None:
    result, _ = run_mpop(
        tmp_path, port=mailbag_server.port, cafile=mailbag_server.cert, starttls=True,
        auth="scram-sha-256", password="wrong",
    )
    assert result.returncode != 0
    assert "authentication failed" in result.stderr.lower()


def test_auth_plain_curl_login_options(mailbag_server: MailbagServer) -> None:
    # curl --login-options AUTH=PLAIN: RFC 4616 PLAIN through AUTH (loopback is trusted).
    mailbag_server.deliver(MESSAGE)
    result = run_curl(
        "--login-options", "AUTH=PLAIN", "-u", "demo:demo",
        f"pop3://127.0.0.1:{mailbag_server.port}/1",
    )
    assert result.returncode == 0, result.stderr
    assert b"hello over sasl" in result.stdout
    assert "mechanism=PLAIN" in mailbag_server.log()


def test_auth_plain_curl_login_options_over_stls(mailbag_server: MailbagServer) -> None:
    result = run_curl(
        "--ssl-reqd", "--cacert", str(mailbag_server.cert), "--login-options", "AUTH=PLAIN",
        "-u", "demo:wrong", f"pop3://127.0.0.1:{mailbag_server.port}/",
    )
    assert result.returncode == 67, result.stderr  # CURLE_LOGIN_DENIED


def test_auth_bare_lists_mechanisms(mailbag_server: MailbagServer) -> None:
    # Old Outlook: a bare AUTH gets +OK, the mechanisms, and "." (pre-RFC 5034 behaviour).
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.multiline_lines("AUTH") == [b"SCRAM-SHA-256", b"PLAIN"]
    c.cmd("QUIT")


def test_auth_plain_long_continuation_line_accepted(mailbag_server: MailbagServer) -> None:
    # SASL lines may be far longer than 255 octets (OAuth-sized tokens).  This one is ~12 kB
    # and is judged on its content (a wrong password), not cut as a long line.
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("AUTH PLAIN") == b"+ "
    blob = plain_blob("demo", "x" * 9000)
    assert len(blob) > 12000
    assert c.cmd(blob) == b"-ERR [AUTH] Authentication failed."
    # The AUTH line itself may also exceed 255 octets (a long initial response).
    assert c.cmd(b"AUTH PLAIN " + plain_blob("demo", "y" * 300)) == (
        b"-ERR [AUTH] Authentication failed."
    )
    c.cmd("QUIT")


def test_auth_continuation_line_over_limit_is_error(mailbag_server: MailbagServer) -> None:
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("AUTH PLAIN") == b"+ "
    assert c.cmd(b"A" * 20000) == b"-ERR Authentication line too long."
    assert c.cmd("USER demo") == b"+OK"  # the connection survives


def test_auth_cancel_and_bad_base64(mailbag_server: MailbagServer) -> None:
    # RFC 5034 section 4: "*" cancels with -ERR; undecodable base64 is a clean -ERR.
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("AUTH SCRAM-SHA-256") == b"+ "
    assert c.cmd("*") == b"-ERR Authentication cancelled."
    assert c.cmd("AUTH PLAIN !!!notbase64") == b"-ERR Invalid base64 data in initial response."
    assert c.cmd("AUTH SCRAM-SHA-256") == b"+ "
    assert c.cmd("%%%") == b"-ERR Invalid base64 data in continued response."
    assert c.cmd("AUTH CRAM-MD5") == b"-ERR Unsupported authentication mechanism."
    assert c.cmd(b"AUTH SCRAM-SHA-256 " + base64.b64encode(b"garbage")) == (
        b"-ERR [AUTH] Authentication failed."
    )
    assert c.cmd("USER demo") == b"+OK"
    assert c.cmd("PASS demo").startswith(b"+OK")
    assert c.cmd("AUTH PLAIN").startswith(b"-ERR")  # RFC 5034: only in AUTHORIZATION
    c.cmd("QUIT")

"""TLS on the wire: STLS (RFC 2595), POP3S (RFC 8314), the injection class, reload, real clients.

Every test runs a real ``mailbag serve`` process on loopback (``mailbag_server``); clients are
the standard library, curl (OpenSSL) and mpop (GnuTLS), each run for real.
"""

from __future__ import annotations

import contextlib
import poplib
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from mailbag.server.listeners import quiet_network_errors
from tests.conftest import MailbagServer
from tests.net.pop3raw import RawPop3
from tests.net.tlshelpers import (
    TlsPop3,
    client_context,
    run_curl,
    run_fetchmail,
    run_mpop,
    set_option,
    wait_until,
)

MESSAGE = b"From: a@example.org\r\nSubject: over TLS\r\n\r\nsecret body\r\n"


def test_stls_poplib_then_login(mailbag_server: MailbagServer) -> None:
    # RFC 2595 section 4: STLS, handshake, then authenticate inside TLS.
    mailbag_server.deliver(MESSAGE)
    client = poplib.POP3(mailbag_server.host, mailbag_server.port, timeout=10)
    assert "STLS" in client.capa()
    client.stls(client_context(mailbag_server.cert))
    assert isinstance(client.sock, ssl.SSLSocket)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    client.user("demo")
    client.pass_("demo")
    assert b"secret body" in b"\r\n".join(client.retr(1)[1])
    client.quit()


def test_pop3s_poplib_implicit_tls_port(mailbag_server: MailbagServer) -> None:
    # RFC 8314 section 3.3: implicit TLS on its own port, TLS from the first byte.
    mailbag_server.deliver(MESSAGE)
    client = poplib.POP3_SSL(
        mailbag_server.host, mailbag_server.tls_port,
        context=client_context(mailbag_server.cert), timeout=10,
    )
    assert "STLS" not in client.capa()  # RFC 2595 section 4: not while already encrypted
    client.user("demo")
    client.pass_("demo")
    assert client.stat()[0] == 1
    client.quit()


def test_capa_stls_only_before_tls_and_before_login(mailbag_server: MailbagServer) -> None:
    # RFC 2449 section 5 + RFC 2595 section 4: STLS is announced only while it can be used;
    # after login CAPA still lists what was offered before login (minus STLS).
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    before = c.multiline_lines("CAPA")
    assert b"STLS" in before
    assert b"SASL SCRAM-SHA-256 PLAIN" in before and b"USER" in before  # loopback is trusted
    assert c.cmd("STLS").startswith(b"+OK")
    c.starttls(client_context(mailbag_server.cert))
    after_tls = c.multiline_lines("CAPA")
    assert b"STLS" not in after_tls
    assert c.cmd("USER demo").startswith(b"+OK")
    assert c.cmd("PASS demo").startswith(b"+OK")
    assert c.multiline_lines("CAPA") == after_tls
    assert c.cmd("STLS").startswith(b"-ERR")  # TRANSACTION state: not a valid command
    c.cmd("QUIT")


def test_stls_pipelined_plaintext_discarded_not_executed(mailbag_server: MailbagServer) -> None:
    # RFC 2595 section 4 / CVE-2011-0411 class: commands a man in the middle appends after
    # STLS, in the same plaintext packet, must never run inside the TLS session.
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    c.send(b"STLS\r\nUSER demo\r\nPASS demo\r\nDELE 1\r\n")
    assert c.line() == b"+OK Begin TLS negotiation now."
    assert c.buf == b""  # the injected commands got no plaintext reply either
    c.starttls(client_context(mailbag_server.cert))
    # Inside TLS the session starts clean: not logged in, no pending USER.
    assert c.cmd("STAT").startswith(b"-ERR")
    assert c.cmd("PASS demo") == b"-ERR No user name given; use USER first."
    c.cmd("QUIT")
    assert wait_until(lambda: "stls-injection" in mailbag_server.log())
    assert "discarded=" in mailbag_server.log()


def test_stls_user_before_stls_is_forgotten(mailbag_server: MailbagServer) -> None:
    # RFC 2595 section 4: the client discards knowledge from before TLS; so does the server.
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("USER demo").startswith(b"+OK")
    assert c.cmd("STLS").startswith(b"+OK")
    c.starttls(client_context(mailbag_server.cert))
    assert c.cmd("PASS demo") == b"-ERR No user name given; use USER first."
    assert c.cmd("USER demo").startswith(b"+OK")
    assert c.cmd("PASS demo").startswith(b"+OK")
    c.cmd("QUIT")


def test_stls_twice_is_error(mailbag_server: MailbagServer) -> None:
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("STLS").startswith(b"+OK")
    c.starttls(client_context(mailbag_server.cert))
    assert c.cmd("STLS") == b"-ERR TLS is already active."
    c.cmd("QUIT")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_pop3s_tls_below_1_2_refused(mailbag_server: MailbagServer) -> None:
    # RFC 8314 section 4.1 / RFC 8996: TLS 1.0 and 1.1 are not negotiated.  This client can
    # speak TLS 1.1 (security level 0), so the refusal is the server's: a protocol_version
    # alert, or (OpenSSL under uvloop) the connection closed in the middle of the handshake.
    context = client_context(mailbag_server.cert)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError) as info:
        TlsPop3(mailbag_server.host, mailbag_server.tls_port, context=context)
    assert info.value.reason in (
        "TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING"
    ), info.value


def test_pop3s_tls_1_2_uses_forward_secret_aead(mailbag_server: MailbagServer) -> None:
    context = client_context(mailbag_server.cert)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    c = TlsPop3(mailbag_server.host, mailbag_server.tls_port, context=context)
    assert isinstance(c.sock, ssl.SSLSocket)
    assert c.sock.version() == "TLSv1.2"
    cipher = c.sock.cipher()
    assert cipher is not None and cipher[0].startswith("ECDHE") and (
        "GCM" in cipher[0] or "CHACHA20" in cipher[0]
    )
    c.cmd("QUIT")


@pytest.mark.parametrize(
    "garbage", [b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\xff\xff" + b"A" * 600]
)
def test_pop3s_garbage_handshake_costs_one_connection(
    mailbag_server: MailbagServer, garbage: bytes
) -> None:
    # A broken handshake closes that connection only, and leaves no traceback in the log.
    with socket.create_connection((mailbag_server.host, mailbag_server.tls_port), 5) as sock:
        sock.sendall(garbage)
        sock.settimeout(5)
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith((b"+OK", b"-ERR"))  # a TLS alert or EOF, never POP3
    client = poplib.POP3_SSL(
        mailbag_server.host, mailbag_server.tls_port,
        context=client_context(mailbag_server.cert), timeout=10,
    )
    client.user("demo")
    client.pass_("demo")
    client.quit()
    assert "Traceback" not in mailbag_server.log()


def test_stls_garbage_handshake_costs_one_connection(mailbag_server: MailbagServer) -> None:
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("STLS").startswith(b"+OK")
    c.send(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 100)
    assert c.closed()
    assert wait_until(lambda: "tls-failed" in mailbag_server.log())
    # The server is fine: a normal STLS session follows.
    c = TlsPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("STLS").startswith(b"+OK")
    c.starttls(client_context(mailbag_server.cert))
    assert c.cmd("USER demo").startswith(b"+OK")
    assert c.cmd("PASS demo").startswith(b"+OK")
    c.cmd("QUIT")
    log = mailbag_server.log()
    assert "Traceback" not in log and 'outcome="tls handshake failed"' in log


def test_stls_silent_client_cut_at_login_deadline(mailbag_home: MailbagServer) -> None:
    # A client that says STLS and then never handshakes holds nothing beyond the login timeout.
    set_option(mailbag_home, "limits", "login_timeout", "1.0")
    mailbag_home.start()
    try:
        c = TlsPop3(mailbag_home.host, mailbag_home.port)
        assert c.cmd("STLS").startswith(b"+OK")
        c.sock.settimeout(5)
        assert c.closed()
        assert wait_until(lambda: "reason=timeout" in mailbag_home.log())
    finally:
        mailbag_home.stop()


def test_pop3s_silent_client_cut_at_handshake_timeout(mailbag_home: MailbagServer) -> None:
    # A TCP connection to the POP3S port that never says ClientHello is closed after
    # limits.login_timeout (the handshake timeout follows it, capped at 30 s).
    set_option(mailbag_home, "limits", "login_timeout", "1.0")
    mailbag_home.start()
    try:
        sock = socket.create_connection((mailbag_home.host, mailbag_home.tls_port), 5)
        sock.settimeout(5)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
        assert time.monotonic() - started < 3.5
        sock.close()
    finally:
        mailbag_home.stop()


def test_pop3s_loop_handler_keeps_network_errors_quiet() -> None:
    # Network errors from clients are one debug line; real bugs still reach the default handler.
    seen: list[dict[str, object]] = []

    class Loop:
        def default_exception_handler(self, context: dict[str, object]) -> None:
            seen.append(context)

    loop = Loop()
    quiet_network_errors(loop, {"message": "SSL handshake failed",  # type: ignore[arg-type]
                                "exception": ssl.SSLError(1, "WRONG_VERSION_NUMBER")})
    quiet_network_errors(loop, {"message": "x", "exception": ConnectionResetError()})  # type: ignore[arg-type]
    assert seen == []
    bug = {"message": "bug", "exception": ValueError("boom")}
    quiet_network_errors(loop, bug)  # type: ignore[arg-type]
    assert seen == [bug]


def _write_trustme_cert(ca: trustme.CA, server: MailbagServer) -> None:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(server.home / "tls" / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(server.home / "tls" / "cert.pem"))


def test_sighup_reloads_certificate_without_dropping_sessions(
    mailbag_home: MailbagServer, tmp_path: Path
) -> None:
    # Certificates generated at test time (trustme); the new one serves new handshakes while
    # a session that started under the old one carries on undisturbed.
    old_ca, new_ca = trustme.CA(), trustme.CA()
    _write_trustme_cert(old_ca, mailbag_home)
    old_pem, new_pem = tmp_path / "old-ca.pem", tmp_path / "new-ca.pem"
    old_ca.cert_pem.write_to_path(str(old_pem))
    new_ca.cert_pem.write_to_path(str(new_pem))
    mailbag_home.start()
    try:
        mailbag_home.deliver(MESSAGE)
        pop3s = TlsPop3(mailbag_home.host, mailbag_home.tls_port, context=client_context(old_pem))
        stls = TlsPop3(mailbag_home.host, mailbag_home.port)
        assert stls.cmd("STLS").startswith(b"+OK")
        stls.starttls(client_context(old_pem))
        assert pop3s.cmd("USER demo").startswith(b"+OK")
        assert pop3s.cmd("PASS demo").startswith(b"+OK")

        _write_trustme_cert(new_ca, mailbag_home)
        assert mailbag_home.proc is not None
        mailbag_home.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded" in mailbag_home.log())

        # New handshakes, on both ports, present the new certificate ...
        with pytest.raises(ssl.SSLCertVerificationError):
            TlsPop3(mailbag_home.host, mailbag_home.tls_port, context=client_context(old_pem))
        fresh = TlsPop3(mailbag_home.host, mailbag_home.tls_port, context=client_context(new_pem))
        fresh.cmd("QUIT")
        stale = TlsPop3(mailbag_home.host, mailbag_home.port)
        assert stale.cmd("STLS").startswith(b"+OK")
        with pytest.raises(ssl.SSLCertVerificationError):
            stale.starttls(client_context(old_pem))
        fresh = TlsPop3(mailbag_home.host, mailbag_home.port)
        assert fresh.cmd("STLS").startswith(b"+OK")
        fresh.starttls(client_context(new_pem))
        fresh.cmd("QUIT")
        # ... while the sessions opened before the reload still work.
        assert pop3s.cmd("STAT").startswith(b"+OK 1 ")
        assert stls.cmd("USER demo").startswith(b"+OK")
        assert pop3s.cmd("QUIT").startswith(b"+OK")
        assert stls.cmd("QUIT").startswith(b"+OK")
        assert mailbag_home.proc.poll() is None
    finally:
        mailbag_home.stop()


def test_sighup_with_broken_certificate_keeps_serving(mailbag_server: MailbagServer) -> None:
    (mailbag_server.home / "tls" / "cert.pem").write_text("not a certificate\n")
    assert mailbag_server.proc is not None
    mailbag_server.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload-failed" in mailbag_server.log())
    # The old certificate is still loaded in the server (we overwrote only the file).
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    c = TlsPop3(mailbag_server.host, mailbag_server.tls_port, context=context)
    assert c.cmd("QUIT").startswith(b"+OK")


def test_pop3s_curl(mailbag_server: MailbagServer) -> None:
    # curl pop3s:// (OpenSSL) verifying against the server's certificate.
    mailbag_server.deliver(MESSAGE)
    url = f"pop3s://127.0.0.1:{mailbag_server.tls_port}/1"
    result = run_curl("--cacert", str(mailbag_server.cert), "-u", "demo:demo", url)
    assert result.returncode == 0, result.stderr
    assert b"secret body" in result.stdout


def test_stls_curl_ssl_reqd(mailbag_server: MailbagServer) -> None:
    # curl --ssl-reqd on the plain port: STLS, or fail rather than send the password in clear.
    mailbag_server.deliver(MESSAGE)
    url = f"pop3://127.0.0.1:{mailbag_server.port}/1"
    result = run_curl("--ssl-reqd", "--cacert", str(mailbag_server.cert), "-u", "demo:demo", url)
    assert result.returncode == 0, result.stderr
    assert b"secret body" in result.stdout
    assert "version=TLSv1." in mailbag_server.log()


@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "pop3s"])
def test_stls_and_pop3s_mpop(mailbag_server: MailbagServer, tmp_path: Path, starttls: bool) -> None:
    # mpop --tls=on with --tls-starttls=on (port 110 style) and off (port 995 style).
    mailbag_server.deliver(MESSAGE)
    port = mailbag_server.port if starttls else mailbag_server.tls_port
    result, maildir = run_mpop(
        tmp_path, port=port, cafile=mailbag_server.cert, starttls=starttls, auth="plain"
    )
    assert result.returncode == 0, result.stderr
    fetched = list((maildir / "new").iterdir())
    assert len(fetched) == 1 and b"secret body" in fetched[0].read_bytes()


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "pop3s"])
def test_stls_and_pop3s_fetchmail(
    mailbag_server: MailbagServer, tmp_path: Path, implicit_tls: bool
) -> None:
    # fetchmail with "sslproto tls1.2+" (must STLS) and with "ssl" (POP3S), verifying the cert.
    mailbag_server.deliver(MESSAGE)
    port = mailbag_server.tls_port if implicit_tls else mailbag_server.port
    result, out = run_fetchmail(
        tmp_path, port=port, cafile=mailbag_server.cert, implicit_tls=implicit_tls
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"secret body" in out.read_bytes()
    if not implicit_tls:
        assert "version=TLSv1." in mailbag_server.log()  # it really upgraded with STLS


def tls_when_free(server: MailbagServer, context: ssl.SSLContext) -> TlsPop3:
    """Connect once an earlier connection's slot (e.g. the fixture's readiness probe) is free."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return TlsPop3(server.host, server.tls_port, context=context)
        except (ssl.SSLError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_pop3s_refusal_by_connection_cap_is_clean(mailbag_home: MailbagServer) -> None:
    # Connections over the per-address cap are closed at accept, before any handshake
    # work (a TLS client could not read a plaintext line): a fast, clean failure, never
    # a hang, and the session already open carries on.
    set_option(mailbag_home, "limits", "max_connections_per_ip", "1")
    mailbag_home.start()
    try:
        context = client_context(mailbag_home.cert)
        first = tls_when_free(mailbag_home, context)
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            TlsPop3(mailbag_home.host, mailbag_home.tls_port, context=context)
        assert time.monotonic() - started < 5
        assert first.cmd("QUIT").startswith(b"+OK")
        assert "reason=\"too many connections\"" in mailbag_home.log()
    finally:
        mailbag_home.stop()


def test_pop3s_handshake_counts_against_connection_caps(mailbag_home: MailbagServer) -> None:
    # Issue 11: a POP3S connection counts from accept, during its handshake too, so a
    # flood of stalled handshakes cannot get past limits.max_connections_per_ip.
    set_option(mailbag_home, "limits", "max_connections_per_ip", "1")
    mailbag_home.start()
    try:
        context = client_context(mailbag_home.cert)
        tls_when_free(mailbag_home, context).cmd("QUIT")
        time.sleep(0.3)
        stalled = socket.create_connection((mailbag_home.host, mailbag_home.tls_port), 5)
        time.sleep(0.3)  # accepted, handshake not even started by the client
        with pytest.raises((ssl.SSLError, ConnectionError)):
            TlsPop3(mailbag_home.host, mailbag_home.tls_port, context=context)
        stalled.close()  # its slot frees when the handshake fails
        later = tls_when_free(mailbag_home, context)
        assert later.greeting.startswith(b"+OK")
        later.cmd("QUIT")
    finally:
        mailbag_home.stop()


def test_stls_over_raw_pop3_helper_still_plain(mailbag_server: MailbagServer) -> None:
    # The plain port never starts TLS unasked: a plain client keeps talking plain POP3.
    c = RawPop3(mailbag_server.host, mailbag_server.port)
    assert c.cmd("USER demo").startswith(b"+OK")
    assert c.cmd("PASS demo").startswith(b"+OK")
    c.cmd("QUIT")

"""SIGHUP: new config, users and certificate for new sessions; open sessions untouched;
a bad config rejected with a clear log line while the old one stays in force."""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
import time

from mailbag.server.tls import write_self_signed
from tests.conftest import MailbagServer
from tests.net.pop3raw import RawPop3


def hup_and_wait(server: MailbagServer, event: str) -> str:
    """Send SIGHUP and wait for one more ``event`` line in the log; return that line."""
    assert server.proc is not None
    before = server.log().count(f" {event} ")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in server.log().splitlines() if f" {event} " in line + " "]
        if len(lines) > before:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} after SIGHUP; log:\n{server.log()}")


def cert_fingerprint(server: MailbagServer) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((server.host, server.tls_port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert tls.recv(512).startswith(b"+OK")
    return hashlib.sha256(der).hexdigest()


def test_sighup_reload_good_then_bad_config_with_session_open(
    mailbag_server: MailbagServer,
) -> None:
    server = mailbag_server
    server.deliver(b"Subject: kept\r\n\r\nstill here\r\n")
    session = RawPop3(server.host, server.port)
    assert session.cmd("USER demo").startswith(b"+OK")
    assert session.cmd("PASS demo").startswith(b"+OK")
    old_cert = cert_fingerprint(server)

    # A good new config: new greeting, new user, new certificate.
    original = server.config.read_text()
    server.config.write_text(
        original.replace('greeting = "mailbag POP3 server ready."', 'greeting = "Reloaded."')
    )
    server.add_user("newbie", "newbie-pw")
    write_self_signed(server.home / "tls" / "cert.pem", server.home / "tls" / "key.pem",
                      "localhost")
    line = hup_and_wait(server, "reloaded")
    assert "config=" in line
    fresh = RawPop3(server.host, server.port)
    assert fresh.greeting.startswith(b"+OK Reloaded.")
    assert fresh.cmd("USER newbie").startswith(b"+OK")
    assert fresh.cmd("PASS newbie-pw").startswith(b"+OK")
    assert fresh.cmd("QUIT").startswith(b"+OK")
    assert cert_fingerprint(server) != old_cert
    assert session.cmd("STAT").startswith(b"+OK 1 ")  # the open session never noticed

    # A bad config: rejected with the key at fault; the last good one stays in force.
    server.config.write_text(original.replace("idle_timeout = 600.0", "idle_timeout = -5"))
    line = hup_and_wait(server, "reload-failed")
    assert "limits.idle_timeout" in line and "error" in line
    again = RawPop3(server.host, server.port)
    assert again.greeting.startswith(b"+OK Reloaded.")
    again.cmd("QUIT")
    # A config naming a certificate that does not exist is rejected as well.
    server.config.write_text(original.replace('cert = "tls/cert.pem"', 'cert = "tls/gone.pem"'))
    line = hup_and_wait(server, "reload-failed")
    assert "gone.pem" in line
    assert cert_fingerprint(server) != old_cert  # still the certificate of the good reload
    session.send(b"RETR 1\r\n")
    assert b"still here" in session.multiline()
    assert session.cmd("QUIT").startswith(b"+OK")
    assert server.proc is not None and server.proc.poll() is None


def test_sighup_applies_lmtp_settings_without_restart(mailbag_server: MailbagServer) -> None:
    """Issue 10: SIGHUP reconfigures the LMTP listener too (size limit, quota), and a
    changed LMTP socket setting is reported as restart-only rather than silently ignored."""
    from tests.net.test_lmtp_client import LmtpClient

    server = mailbag_server
    big = b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n"

    def deliver(message: bytes) -> tuple[int, str]:
        client = LmtpClient(port=server.lmtp_port)
        assert client.lhlo()[0] == 250
        t = client.transaction("s@example.org", ["demo"], message)
        client.close()
        if t.per_recipient:
            return t.per_recipient[0]
        return t.data

    assert deliver(big)[0] == 250  # the default limit is 50 MB
    original = server.config.read_text()
    changed = original.replace("max_message_size = 52428800", "max_message_size = 1000")
    assert original.count("\nmessages = 0\n") == 1  # the [quota] key
    changed = changed.replace("\nmessages = 0\n", "\nmessages = 2\n")
    changed = changed.replace("timeout = 300.0", "timeout = 301.0", 1)
    changed = changed.replace("socket_mode = 0o660", "socket_mode = 0o600", 1)
    assert changed.count("max_message_size = 1000") == 1 and "messages = 2" in changed
    server.config.write_text(changed)
    hup_and_wait(server, "reloaded")
    # RFC 1870: the new limit is announced and enforced at once, without a restart.
    client = LmtpClient(port=server.lmtp_port)
    code, text = client.lhlo()
    assert code == 250 and "SIZE 1000" in text
    client.close()
    code, _ = deliver(big)
    assert code == 552
    # [quota] messages = 2: the second message fits, the third is refused.
    assert deliver(b"Subject: small\r\n\r\nok\r\n")[0] == 250
    assert deliver(b"Subject: third\r\n\r\nno room\r\n")[0] in (452, 552)
    log = server.log()
    assert "reload-needs-restart" in log and "setting=lmtp.socket_mode" in log

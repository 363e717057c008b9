"""Every login a server offers: SCRAM-SHA-256, PLAIN, APOP, USER/PASS; ``--auth``; refusals.

Pure parts (the SCRAM client, APOP digest, the choice) are checked against
the RFC examples; the exchanges run against mailbag and Dovecot (both offer
all four), an impostor SCRAM server is scripted, and a Dovecot that refuses
plaintext without TLS shows the "no usable login" message.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator

import pytest

from mailbag.client import sasl
from mailbag.client.account import parse_url
from mailbag.client.connection import open_session
from mailbag.client.pop3 import POP3Client
from tests.client.conftest import Run
from tests.client.pop3servers import Target
from tests.client.test_pop3_client import FakeServer
from tests.dovecot import PrivateDovecot, dovecot_unavailable

# RFC 7677 section 3 example.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
MESSAGE = b"From: a@example.org\r\nSubject: login\r\n\r\nhello\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_login_scram_client_matches_rfc7677_example() -> None:
    # RFC 7677 section 3: the exact client-first, client-final and server signature.
    client = sasl.ScramClient("user", "pencil", nonce=RFC_NONCE)
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify(RFC_SERVER_FINAL)  # no exception: the server proved itself


@pytest.mark.parametrize(("server_first", "error"), [
    (b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
    (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
    (b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1", "iteration"),
    (b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=999999999999", "iteration"),
    (b"r=rOprNGfwEbeRWgbNEkqOxx,s=!!,i=4096", "salt"),
    (b"e=other-error", "server error"),
])
def test_login_scram_client_refuses_bad_server_first(server_first: bytes, error: str) -> None:
    # RFC 5802 section 5.1: the server nonce must start with the client's; RFC 7677: i >= 4096.
    with pytest.raises(sasl.LoginError, match=error):
        sasl.ScramClient("user", "pencil", nonce=RFC_NONCE).final(server_first)


def test_login_scram_client_refuses_wrong_server_signature() -> None:
    # RFC 5802 section 3: the client MUST verify ServerSignature.
    client = sasl.ScramClient("user", "pencil", nonce=RFC_NONCE)
    client.final(RFC_SERVER_FIRST)
    with pytest.raises(sasl.LoginError, match="signature is wrong"):
        client.verify(b"v=" + b64(b"x" * 32))
    with pytest.raises(sasl.LoginError, match="signature is wrong"):
        client.verify(b"")


def test_login_scram_user_name_is_escaped() -> None:
    # RFC 5802 section 5.1: "," and "=" in saslname become =2C and =3D.
    assert sasl.ScramClient("a,b=c", "x", nonce="n").first() == b"n,,n=a=2Cb=3Dc,r=n"


def test_login_apop_digest_rfc1939_example() -> None:
    # RFC 1939 section 7 example.
    stamp = sasl.apop_timestamp("+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>")
    assert stamp == "<1896.697170952@dbc.mtview.ca.us>"
    assert sasl.apop_digest(stamp, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"
    assert sasl.apop_timestamp("+OK ready") is None


@pytest.mark.parametrize(("caps", "greeting", "expected"), [
    ({"SASL": ["PLAIN", "SCRAM-SHA-256"], "USER": []}, "+OK <1.2@h>", "scram-sha-256"),
    ({"SASL": ["PLAIN"], "USER": []}, "+OK <1.2@h>", "plain"),
    ({"USER": []}, "+OK <1.2@h>", "user"),
    ({"SASL": ["GSSAPI"]}, "+OK <1.2@h>", "apop"),
    (None, "+OK old server", "user"),
])
def test_login_auto_prefers_scram_then_plain_user_apop(
        caps: dict[str, list[str]] | None, greeting: str, expected: str) -> None:
    assert sasl.choose("auto", caps, greeting, host="h", tls=True) == expected


def test_login_none_allowed_is_a_clear_message() -> None:
    with pytest.raises(sasl.LoginError) as info:
        sasl.choose("auto", {"SASL": ["GSSAPI"], "UIDL": []}, "+OK ready", host="h", tls=False)
    text = str(info.value)
    assert "no login method" in text and "only over TLS" in text and "GSSAPI" in text


def test_login_forced_apop_without_timestamp_is_refused() -> None:
    with pytest.raises(sasl.LoginError, match="does not offer APOP"):
        sasl.choose("apop", {"USER": []}, "+OK ready", host="h", tls=True)


class _Recorder:
    """Wraps a socket's sendall to keep every byte the client sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent = sock, b""

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)

    def sendall(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)


@pytest.mark.parametrize("mechanism", ["scram-sha-256", "plain", "apop", "user"])
def test_login_every_mechanism_against_real_servers(pop3: Target, mechanism: str) -> None:
    # RFC 5034 + RFC 7677 (SCRAM), RFC 4616 (PLAIN), RFC 1939 section 7 (APOP), USER/PASS.
    pop3.deliver(MESSAGE)
    client = POP3Client.connect(pop3.host, pop3.port, tls="none")
    recorder = _Recorder(client._sock)
    client._sock = recorder  # type: ignore[assignment]
    try:
        client.login(pop3.user, pop3.password, mechanism)
        assert client.mechanism == mechanism
        assert client.stat()[0] == 1
    finally:
        client.quit()
    secret = pop3.password.encode()
    plain_blob = b64(sasl.plain_response(pop3.user, pop3.password))
    if mechanism in {"scram-sha-256", "apop"}:  # the password never crosses the wire
        assert secret not in recorder.sent and plain_blob not in recorder.sent
        for word in recorder.sent.split():
            try:
                decoded = base64.b64decode(word, validate=True)
            except ValueError:
                continue
            assert secret not in decoded
    else:
        assert secret in recorder.sent or plain_blob in recorder.sent  # the check can fail


def test_login_auto_uses_scram_on_both_servers(pop3: Target) -> None:
    account = parse_url(pop3.url).with_password(pop3.password)
    client = open_session(account, ca=pop3.ca)
    try:
        assert client.tls and client.mechanism == "scram-sha-256"
    finally:
        client.quit()


def test_login_scram_wrong_password_fails_cleanly(pop3: Target, run_cli: Run) -> None:
    result = run_cli(pop3, "--auth", "scram-sha-256", "list", password="not-it")
    assert result.code != 0 and "mailbag: error" in result.err and "AUTH" in result.err


@pytest.mark.parametrize("mechanism", ["apop", "plain", "user", "scram-sha-256"])
def test_login_auth_option_forces_the_mechanism(pop3: Target, run_cli: Run,
                                                mechanism: str) -> None:
    pop3.deliver(MESSAGE)
    result = run_cli(pop3, "--auth", mechanism, "list", "--json")
    assert result.code == 0, result.err
    assert '"count": 1' in result.out


def test_login_auth_option_after_subcommand(pop3: Target, run_cli: Run) -> None:
    result = run_cli(pop3, "list", "--auth", "apop")
    assert result.code == 0, result.err


@pytest.fixture
def scram_impostor(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeServer]]:
    """A scripted server that answers SCRAM with RFC 7677's server-first (fixed nonce)."""
    original = sasl.ScramClient

    def fixed_nonce(user: str, password: str, nonce: str | None = None) -> sasl.ScramClient:
        return original(user, password, nonce=RFC_NONCE)

    monkeypatch.setattr(sasl, "ScramClient", fixed_nonce)
    yield FakeServer


def _scram_script(after_final: bytes) -> dict[str, bytes]:
    return {
        "CAPA": b"+OK\r\nSASL SCRAM-SHA-256\r\n.\r\n",
        "AUTH SCRAM-SHA-256": b"+ " + b64(RFC_SERVER_FIRST) + b"\r\n",
        b64(RFC_CLIENT_FINAL).decode(): after_final,
        "*": b"-ERR cancelled\r\n",
        "QUIT": b"+OK\r\n",
    }


def test_login_scram_impostor_signature_cancels(scram_impostor: type[FakeServer]) -> None:
    server = scram_impostor(b"+OK hi\r\n",
                            _scram_script(b"+ " + b64(b"v=" + b64(b"y" * 32)) + b"\r\n"))
    client = POP3Client.connect("127.0.0.1", server.port, tls="none")
    with pytest.raises(sasl.LoginError, match="signature is wrong"):
        client.login("user", "pencil")
    client.close()
    assert server.received[-1] == "*"  # RFC 5034 section 4: "*" cancels the exchange


def test_login_scram_success_without_signature_is_refused(
        scram_impostor: type[FakeServer]) -> None:
    server = scram_impostor(b"+OK hi\r\n", _scram_script(b"+OK logged in\r\n"))
    client = POP3Client.connect("127.0.0.1", server.port, tls="none")
    with pytest.raises(sasl.LoginError, match="without proving"):
        client.login("user", "pencil")
    client.close()


def test_login_scram_with_genuine_signature(scram_impostor: type[FakeServer]) -> None:
    server = scram_impostor(b"+OK hi\r\n",
                            _scram_script(b"+ " + b64(RFC_SERVER_FINAL) + b"\r\n"))
    server.script[""] = b"+OK welcome\r\n"  # the empty response after server-final
    client = POP3Client.connect("127.0.0.1", server.port, tls="none")
    assert client.login("user", "pencil") == "+OK welcome"
    client.quit()


def test_login_dovecot_refusing_plaintext_without_tls(run_cli: Run,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # disable_plaintext_auth = yes and no TLS: no USER in CAPA, no SASL PLAIN.  Dovecot trusts
    # a connection whose ends share an address, so it listens on 127.0.0.2 (still loopback).
    reason = dovecot_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here")
    server = PrivateDovecot(users=[("alice", "pw-alice")], mechanisms="plain", plaintext=False,
                            listen="127.0.0.2")
    server.maildir("alice")
    try:
        server.start()
        target = Target("dovecot", "127.0.0.2", server.port, 0, "alice", "pw-alice", "",
                        server.maildir("alice"))
        monkeypatch.setenv("MAILBAG_PASSWORD", "pw-alice")
        result = run_cli(None, "-a", target.url, "list")
        assert result.code != 0
        assert "offers no login method" in result.err and "only over TLS" in result.err
        assert "Traceback" not in result.err
    finally:
        server.cleanup()


def test_login_auto_scram_failure_suggests_plain(pop3: Target, run_cli: Run) -> None:
    result = run_cli(pop3, "list", password="not-it")
    assert result.code != 0 and "try --auth plain" in result.err
    forced = run_cli(pop3, "--auth", "scram-sha-256", "list", password="not-it")
    assert "try --auth plain" not in forced.err

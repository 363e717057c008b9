"""Client protocol safety against scripted fake servers (no real server can misbehave on cue).

Covers RFC 2595 rules (STLS refused after being offered is fatal; bytes
injected before the TLS handshake abort the session), RFC 5034 AUTH with an
empty continuation, pre-CAPA servers, and account URL parsing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbag.client.account import netrc_password, parse_url, resolve_password
from mailbag.client.pop3 import POP3Client, POP3Error, POP3ProtocolError
from mailbag.errors import ConfigError


class FakeServer:
    """Replies from a script: {command prefix: reply bytes}; records what it got."""

    def __init__(self, greeting: bytes, script: dict[str, bytes]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.greeting, self.script, self.received = greeting, script, []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(self.greeting)
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    text = line.decode()
                    self.received.append(text)
                    reply = next((r for k, r in self.script.items() if text.startswith(k)),
                                 b"-ERR unknown\r\n")
                    conn.sendall(reply)
                    if text == "QUIT":
                        return


@pytest.fixture
def fake() -> Iterator[type[FakeServer]]:
    yield FakeServer


CAPA_STLS = b"+OK\r\nSTLS\r\nSASL PLAIN\r\nUIDL\r\n.\r\n"


def test_stls_refused_after_offer_is_an_error(fake: type[FakeServer]) -> None:
    server = fake(b"+OK hi\r\n", {"CAPA": CAPA_STLS, "STLS": b"-ERR not today\r\n"})
    with pytest.raises(POP3ProtocolError, match="offered STLS but refused"):
        POP3Client.connect("127.0.0.1", server.port, tls="starttls")
    assert "PASS" not in " ".join(server.received) and "AUTH" not in " ".join(server.received)


def test_stls_injected_bytes_before_handshake_abort(fake: type[FakeServer]) -> None:
    server = fake(b"+OK hi\r\n", {"CAPA": CAPA_STLS,
                                  "STLS": b"+OK go\r\n+OK injected plaintext\r\n"})
    with pytest.raises(POP3ProtocolError, match="before the TLS handshake"):
        POP3Client.connect("127.0.0.1", server.port, tls="starttls")


def test_auth_plain_with_empty_continuation(fake: type[FakeServer]) -> None:
    server = fake(b"+OK hi\r\n", {"CAPA": b"+OK\r\nSASL PLAIN\r\n.\r\n", "AUTH": b"+ \r\n",
                                  "AHVzZXIAcHc=": b"+OK welcome\r\n", "QUIT": b"+OK bye\r\n"})
    client = POP3Client.connect("127.0.0.1", server.port, tls="none")
    assert client.login("user", "pw").startswith("+OK")
    client.quit()
    assert server.received[-2] == "AHVzZXIAcHc="


def test_login_without_capa_uses_user_pass(fake: type[FakeServer]) -> None:
    server = fake(b"+OK old server\r\n", {"USER": b"+OK\r\n", "PASS": b"+OK in\r\n",
                                          "QUIT": b"+OK\r\n"})
    traced: list[str] = []
    client = POP3Client.connect("127.0.0.1", server.port, tls="none",
                                trace=lambda d, line: traced.append(f"{d}: {line}"))
    assert client.capabilities is None
    client.login("u", "topsecret")
    client.quit()
    assert "C: PASS ********" in traced and not any("topsecret" in t for t in traced)


def test_err_response_code_is_parsed(fake: type[FakeServer]) -> None:
    server = fake(b"+OK\r\n", {"CAPA": b"+OK\r\n.\r\n", "USER": b"+OK\r\n",
                               "PASS": b"-ERR [IN-USE] locked\r\n"})
    client = POP3Client.connect("127.0.0.1", server.port, tls="none")
    with pytest.raises(POP3Error) as info:
        client.login("u", "p", "user")
    assert info.value.code == "IN-USE"
    client.close()


def test_account_url_forms() -> None:
    acc = parse_url("pop3://me@163.com@pop.163.com")
    assert (acc.user, acc.host, acc.port, acc.tls) == ("me@163.com", "pop.163.com", 110, "starttls")
    acc = parse_url("pop3s://me%40qq.com@[::1]:1995")
    assert (acc.user, acc.host, acc.port, acc.tls) == ("me@qq.com", "::1", 1995, "implicit")
    assert parse_url("pop://u;AUTH=+USER@h").mechanism == "user"
    assert "hunter2" not in repr(acc.with_password("hunter2"))


@pytest.mark.parametrize("url", ["imap://u@h", "pop3://h", "pop3://u:pw@h", "pop3://u@h:99999",
                                 "pop3://u;FOO=1@h"])
def test_account_bad_urls_rejected(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(url)


def test_account_password_never_in_repr_and_sources(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    acc = parse_url("pop3://alice@mail.example")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine mail.example login alice password from-netrc\n")
    netrc.chmod(0o600)
    assert netrc_password(acc, netrc) == "from-netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    resolved = resolve_password(acc, prompt=False)
    assert resolved.password == "from-netrc" and "from-netrc" not in repr(resolved)
    monkeypatch.setenv("MAILBAG_PASSWORD", "from-env")
    assert resolve_password(acc, prompt=False).password == "from-env"
    monkeypatch.delenv("MAILBAG_PASSWORD")
    monkeypatch.delenv("NETRC")
    with pytest.raises(ConfigError, match="no password"):
        resolve_password(acc, prompt=False)

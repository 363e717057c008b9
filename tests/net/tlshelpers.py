"""Helpers for the security tests: config edits, TLS contexts, SASL over a raw socket, real clients.

Kept out of ``tests/conftest.py`` (shared by every suite) because only the TLS, SASL and
security tests need them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import scramp  # type: ignore[import-untyped]

from tests.conftest import MailbagServer
from tests.net.pop3raw import RawPop3


def set_option(server: MailbagServer, section: str, key: str, value: str) -> None:
    """Set ``key = value`` (TOML text) inside ``[section]`` of the server's config file.

    Keys repeat across sections (``listen``, ``max_connections``), so the edit is scoped.
    """
    text = server.config.read_text()
    start = text.index(f"\n[{section}]\n")
    end = text.find("\n[", start + 1)
    end = len(text) if end < 0 else end
    body, count = re.subn(
        rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text[start:end], count=1
    )
    assert count == 1, f"{section}.{key} not in the config template"
    server.config.write_text(text[:start] + body + text[end:])


def client_context(cafile: Path | str) -> ssl.SSLContext:
    """A verifying client context, as a careful mail client would build it."""
    return ssl.create_default_context(cafile=str(cafile))


class TlsPop3(RawPop3):
    """``RawPop3`` that can upgrade with STLS, or start in TLS (POP3S), from a chosen source."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        source: str | None = None,
        context: ssl.SSLContext | None = None,
        timeout: float = 10,
    ) -> None:
        sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.buf = b""
        self.greeting = self.line()

    def starttls(self, context: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        """Wrap the socket after ``+OK`` to STLS (RFC 2595 section 4)."""
        assert not self.buf, "unread plaintext before the handshake"
        self.sock = context.wrap_socket(self.sock, server_hostname=host)

    def multiline_lines(self, command: str) -> list[bytes]:
        self.send(command.encode() + b"\r\n")
        body = self.multiline()
        return body.split(b"\r\n")[:-1] if body else []


def scram_login(
    conn: RawPop3,
    user: str,
    password: str,
    *,
    initial: bool = True,
    transcript: list[bytes] | None = None,
) -> tuple[bytes, scramp.ScramClient]:
    """Run SCRAM-SHA-256 with scramp's client; return the final reply line and the client.

    On success the client has verified the server's signature (``set_server_final``).
    ``transcript`` collects the client's base64 messages (to check they are never logged).
    """
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    first = base64.b64encode(client.get_client_first().encode())
    if initial:
        conn.send(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
    else:
        assert conn.cmd("AUTH SCRAM-SHA-256") == b"+ "
        conn.send(first + b"\r\n")
    reply = conn.line()
    if not reply.startswith(b"+ "):
        return reply, client
    client.set_server_first(base64.b64decode(reply[2:]).decode())
    final = base64.b64encode(client.get_client_final().encode())
    if transcript is not None:
        transcript += [first, final]
    conn.send(final + b"\r\n")
    reply = conn.line()
    if not reply.startswith(b"+ "):
        return reply, client
    client.set_server_final(base64.b64decode(reply[2:]).decode())  # raises if forged
    conn.send(b"\r\n")  # RFC 5034 section 4: empty response to the server-final challenge
    return conn.line(), client


def plain_blob(user: str, password: str, authzid: str = "") -> bytes:
    """RFC 4616 PLAIN message, base64-encoded for the wire."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def need(program: str) -> str:
    """Path of an external client, or skip (CI installs them all, see ``.ci/run``)."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} not installed")
    return path


def run_curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [need("curl"), "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def run_mpop(
    tmp: Path,
    *,
    port: int,
    cafile: Path,
    starttls: bool,
    auth: str,
    password: str = "demo",
    user: str = "demo",
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Fetch with mpop (GnuTLS + GNU SASL) into a fresh Maildir; returns result and Maildir.

    ``mpop -C`` reads only the given file, which must be private (mode 0600) because it
    holds a password.  ``keep on`` leaves the mail on the server for the next test step.
    """
    maildir = tmp / f"mpop-{port}-{auth}-{int(starttls)}-{time.monotonic_ns()}"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    rc = maildir.with_suffix(".rc")
    rc.write_text(
        "defaults\n"
        "tls on\n"
        f"tls_starttls {'on' if starttls else 'off'}\n"
        f"tls_trust_file {cafile}\n"
        "account test\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        f"user {user}\n"
        f"password {password}\n"
        f"auth {auth}\n"
        "keep on\n"
        "only_new off\n"
        f"uidls_file {maildir}.uidls\n"
        f"delivery maildir {maildir}\n"
    )
    os.chmod(rc, 0o600)
    result = subprocess.run(
        [need("mpop"), "-C", str(rc), "test"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, maildir


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` (e.g. "the log says reloaded") instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def run_fetchmail(
    tmp: Path, *, port: int, cafile: Path, implicit_tls: bool
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Fetch with fetchmail (OpenSSL), keeping the mail, into a BSMTP file; returns result, file.

    ``sslproto tls1.2+`` on the plain port makes fetchmail insist on STLS; ``ssl`` is POP3S.
    fetchmail checks only the certificate's DNS names, hence ``sslcommonname localhost``.
    """
    stamp = time.monotonic_ns()
    out = tmp / f"fetchmail-{stamp}.bsmtp"
    rc = tmp / f"fetchmail-{stamp}.rc"
    tls = "ssl" if implicit_tls else "sslproto tls1.2+"
    rc.write_text(
        f"poll 127.0.0.1 protocol pop3 port {port} auth password\n"
        f'  user "demo" password "demo" is root here\n'
        f'  {tls} sslcommonname localhost sslcertck sslcertfile "{cafile}"\n'
        f'  keep fetchall bsmtp "{out}"\n'
    )
    os.chmod(rc, 0o600)
    env = dict(os.environ, HOME=str(tmp), FETCHMAILHOME=str(tmp))
    result = subprocess.run(
        [need("fetchmail"), "-f", str(rc), "--nosyslog", "--pidfile", f"{rc}.pid"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    return result, out

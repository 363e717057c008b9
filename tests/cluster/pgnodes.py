"""mailbag nodes on PostgreSQL for the cluster tests: config, users, clients with a source address.

Nodes trust 127.0.0.1 (HAProxy) as their proxy, so a test that talks to one
node directly connects from ``DIRECT`` (127.0.0.3: local for the plaintext
policy, not a proxy).
"""

from __future__ import annotations

import poplib
import re
import smtplib
import socket
from pathlib import Path

from tests.conftest import TEST_ARGON2, MailbagServer, make_home
from tests.net.pop3raw import RawLines
from tests.net.tlshelpers import set_option

DIRECT = "127.0.0.3"


def postgres_node(tmp: Path, dsn: str, *, lease_time: float = 3.0, name: str = "") -> MailbagServer:
    """A node home whose mail, users and locks are in the database ``dsn``."""
    node = make_home(tmp)
    text = node.config.read_text()
    text = re.sub(r'(\n\[storage\]\n(?:#[^\n]*\n)*)backend = "maildir"',
                  r'\1backend = "postgres"', text, count=1)
    text = text.replace('backend = "file"', 'backend = "postgres"', 1)
    text = text.replace('dsn = ""', f'dsn = "{dsn}"', 1)
    text = text.replace("lease_time = 30.0", f"lease_time = {lease_time}", 1)
    if name:
        text = text.replace('node_name = ""', f'node_name = "{name}"', 1)
    node.config.write_text(text)
    set_option(node, "server", "trusted_proxies", '["127.0.0.1/32"]')
    return node


def add_users(dsn: str, *names: str, password: str = "pw") -> None:
    """Create accounts in the shared users table (cheap Argon2)."""
    from mailbag.auth.pg_users import PostgresUsers

    users = PostgresUsers(dsn, argon2_params=TEST_ARGON2)
    for name in names:
        users.add(name, password)


class Pop3From(poplib.POP3):
    """poplib's client, connecting from a chosen loopback source address."""

    def __init__(self, host: str, port: int, source: str = DIRECT, timeout: float = 15) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


def login(port: int, user: str, password: str = "pw", source: str = DIRECT) -> Pop3From:
    client = Pop3From("127.0.0.1", port, source)
    client.user(user)
    client.pass_(password)
    return client


def subject(client: poplib.POP3, number: int) -> str:
    """The Subject of message ``number`` (TOP n 0: headers only)."""
    for line in client.top(number, 0)[1]:
        if line.startswith(b"Subject: "):
            return line[9:].decode()
    return ""


def lmtp_send(port: int, recipients: list[str], body: bytes,
              source: str = DIRECT) -> dict[str, tuple[int, bytes]]:
    """One LMTP transaction; the recipients refused, at RCPT or after DATA.

    By hand rather than ``smtplib.LMTP``, which reads one reply after DATA
    where RFC 2033 section 4.2 gives one per accepted recipient.  A refused
    MAIL or DATA, or a broken connection, raises ``smtplib.SMTPResponseException``
    or ``OSError``.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=15,
                                    source_address=(source, 0))
    lines = RawLines(sock)

    def reply() -> tuple[int, bytes]:
        while True:
            line = lines.line()
            if line[3:4] != b"-":
                return int(line[:3]), line[4:]

    def expect(command: bytes, ok: int) -> None:
        sock.sendall(command + b"\r\n")
        code, text = reply()
        if code != ok:
            raise smtplib.SMTPResponseException(code, text)

    try:
        code, text = reply()
        if code != 220:
            raise smtplib.SMTPResponseException(code, text)
        expect(b"LHLO test.example", 250)
        expect(b"MAIL FROM:<sender@example.org>", 250)
        refused: dict[str, tuple[int, bytes]] = {}
        accepted = []
        for rcpt in recipients:
            sock.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
            code, text = reply()
            if code == 250:
                accepted.append(rcpt)
            else:
                refused[rcpt] = (code, text)
        if not accepted:
            return refused
        expect(b"DATA", 354)
        data = body.replace(b"\r\n.", b"\r\n..")
        sock.sendall(data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        for rcpt in accepted:  # RFC 2033 4.2: one reply per accepted recipient
            code, text = reply()
            if code != 250:
                refused[rcpt] = (code, text)
        sock.sendall(b"QUIT\r\n")
        return refused
    finally:
        sock.close()

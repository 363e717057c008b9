"""Two real mailbag nodes on one PostgreSQL: users, LMTP, POP3 and the lock across nodes.

Everything goes through the real command line and real sockets: accounts
are created with ``mailbag user`` (``auth.backend = "postgres"``), mail
arrives over LMTP at one node and is read over POP3 from the other, a
second login on either node gets ``[IN-USE]``, and a password changed with
``mailbag user passwd`` works at once on every node (no reload).
"""

from __future__ import annotations

import poplib
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MailbagServer, make_home
from tests.pgtest import fresh_database


def postgres_node(tmp: Path, dsn: str) -> MailbagServer:
    node = make_home(tmp)
    text = node.config.read_text()
    text = re.sub(r'(\n\[storage\]\n(?:#[^\n]*\n)*)backend = "maildir"', r'\1backend = "postgres"',
                  text, count=1)
    text = text.replace('backend = "file"', 'backend = "postgres"', 1)
    text = text.replace('dsn = ""', f'dsn = "{dsn}"', 1).replace("lease_time = 30.0",
                                                                  "lease_time = 5.0")
    node.config.write_text(text)
    return node


def mailbag(node: MailbagServer, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailbag", *args, "-c", str(node.config)],
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[MailbagServer, MailbagServer]]:
    with fresh_database() as dsn:
        a = postgres_node(tmp_path / "a", dsn)
        b = postgres_node(tmp_path / "b", dsn)
        try:
            a.start()
            b.start()
            yield a, b
        finally:
            a.stop()
            b.stop()


def pop3(node: MailbagServer, user: str, password: str) -> poplib.POP3:
    client = poplib.POP3(node.host, node.port, timeout=10)
    client.user(user)
    client.pass_(password)
    return client


def test_two_nodes_share_users_mail_and_locks(nodes: tuple[MailbagServer, MailbagServer]) -> None:
    a, b = nodes
    added = mailbag(a, "user", "add", "alice", "--password-stdin", "--apop", stdin="s3cret\n")
    assert added.returncode == 0, added.stderr
    assert mailbag(b, "user", "quota", "alice", "--messages", "5").returncode == 0
    listing = mailbag(b, "user", "list")
    assert re.search(r"alice\s+0\s+0\s+5\s+-", listing.stdout), listing.stdout

    with smtplib.LMTP(a.host, a.lmtp_port, timeout=10) as lmtp:
        lmtp.sendmail("sender@example.org", ["alice"], b"Subject: hello\r\n\r\nfrom node a\r\n")
        refused = lmtp.sendmail("s@example.org", ["alice", "nobody"], b"Subject: 2\r\n\r\nx\r\n")
        assert set(refused) == {"nobody"}

    client = pop3(b, "alice", "s3cret")
    count, _ = client.stat()
    assert count == 2
    assert b"from node a" in b"\r\n".join(client.retr(1)[1])
    # RFC 1939 section 8 (PASS): exclusive access; a second login from any node gets [IN-USE].
    for other in (a, b):
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            pop3(other, "alice", "s3cret")
    client.dele(1)
    client.quit()

    changed = mailbag(b, "user", "passwd", "alice", "--password-stdin", stdin="n3w\n")
    assert changed.returncode == 0, changed.stderr
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop3(a, "alice", "s3cret")  # seen by the other node at once, no reload
    client = pop3(a, "alice", "n3w")
    assert client.stat()[0] == 1
    client.quit()
    assert mailbag(a, "user", "del", "alice").returncode == 0
    assert "alice" not in mailbag(b, "user", "list").stdout
    assert not (a.home / "mail" / "alice").exists()  # the mail was in the database

"""`mailbag migrate maildir postgres` and back, end to end through real servers.

A POP3 client must not notice the move (issue 13, "Migration"): before and
after each direction the UIDL and LIST answers of a real `mailbag serve`
are byte-identical, and so is every message.  Re-running copies nothing
twice; the progress output and the summary are what an administrator reads.
"""

from __future__ import annotations

import io
import poplib
import re
import smtplib
import subprocess
import sys
from pathlib import Path

from mailbag.cli.progress import ProgressBar
from tests.conftest import MailbagServer, make_home
from tests.pgtest import fresh_database

Listing = tuple[list[bytes], list[bytes], list[bytes]]


def set_backend(node: MailbagServer, backend: str) -> None:
    text = node.config.read_text()
    text = re.sub(r'(\n\[storage\]\n(?:#[^\n]*\n)*)backend = "\w+"', rf'\1backend = "{backend}"',
                  text, count=1)
    node.config.write_text(text)


def mailbag(node: MailbagServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailbag", *args, "-c", str(node.config)],
                          capture_output=True, text=True, timeout=120, check=False)


def listing(node: MailbagServer, user: str, password: str) -> Listing:
    """UIDL and LIST as the server sends them, and every message, through a real server."""
    node.start()
    try:
        client = poplib.POP3(node.host, node.port, timeout=10)
        client.user(user)
        client.pass_(password)
        uidl, lst = client.uidl()[1], client.list()[1]
        bodies = [b"\r\n".join(client.retr(i)[1]) for i in range(1, len(lst) + 1)]
        client.quit()
    finally:
        node.stop()
    return uidl, lst, bodies


def lmtp(node: MailbagServer, *messages: bytes) -> None:
    node.start()
    try:
        with smtplib.LMTP(node.host, node.lmtp_port, timeout=10) as client:
            for message in messages:
                assert client.sendmail("s@example.org", ["alice"], message) == {}
        # One message read and deleted, so the maildrop has a gap to keep.
        client3 = poplib.POP3(node.host, node.port, timeout=10)
        client3.user("alice")
        client3.pass_("pw")
        client3.dele(2)
        client3.quit()
    finally:
        node.stop()


def test_maildir_to_postgres_and_back_keeps_uidl_and_list(tmp_path: Path) -> None:
    with fresh_database() as dsn:
        node = make_home(tmp_path / "home")
        text = node.config.read_text().replace('dsn = ""', f'dsn = "{dsn}"', 1)
        node.config.write_text(text)
        node.add_user("alice", "pw")
        big = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 12000  # > 3 body rows
        lmtp(node, b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\ngone\r\n", big,
             b"Subject: bare\n\nLF only, no final newline")
        before = listing(node, "alice", "pw")
        assert len(before[0]) == 3

        moved = mailbag(node, "migrate", "maildir", "postgres")
        assert moved.returncode == 0, moved.stderr
        assert "alice: 3 messages, 3 copied, 0 already there; verified" in moved.stdout
        assert "from maildir to postgres, 0 failed" in moved.stdout
        again = mailbag(node, "migrate", "maildir", "postgres")  # resumable: nothing twice
        assert "alice: 3 messages, 0 copied, 3 already there; verified" in again.stdout

        set_backend(node, "postgres")
        assert listing(node, "alice", "pw") == before
        node.start()  # new mail arrives on postgres before the way back
        try:
            with smtplib.LMTP(node.host, node.lmtp_port, timeout=10) as client:
                client.sendmail("s@example.org", ["alice"], b"Subject: late\r\n\r\nx\r\n")
        finally:
            node.stop()
        on_postgres = listing(node, "alice", "pw")
        assert on_postgres[0][:3] == before[0] and len(on_postgres[0]) == 4

        text = node.config.read_text().replace('maildir = "mail/{user}/Maildir"',
                                               'maildir = "mail2/{user}/Maildir"')
        node.config.write_text(text)
        dry = mailbag(node, "migrate", "postgres", "maildir", "--dry-run", "--user", "alice")
        assert "alice: 4 messages, 4 would be copied" in dry.stdout
        assert not (node.home / "mail2" / "alice").exists()
        back = mailbag(node, "migrate", "postgres", "maildir")
        assert back.returncode == 0, back.stderr
        assert "alice: 4 messages, 4 copied, 0 already there; verified" in back.stdout
        set_backend(node, "maildir")
        assert listing(node, "alice", "pw") == on_postgres


def test_migrate_reports_unknown_user_and_same_backend(tmp_path: Path) -> None:
    node = make_home(tmp_path)
    no_dsn = mailbag(node, "migrate", "maildir", "postgres")
    assert no_dsn.returncode == 1 and "database.dsn: the postgres backends need a dsn" in (
        no_dsn.stderr)
    node.config.write_text(node.config.read_text().replace(
        'dsn = ""', 'dsn = "postgresql://127.0.0.1:1/unused"', 1))
    unknown = mailbag(node, "migrate", "maildir", "postgres", "--user", "nobody")
    assert unknown.returncode == 2 and "no such user: nobody" in unknown.stderr
    same = mailbag(node, "migrate", "maildir", "maildir")
    assert same.returncode == 2 and "invalid choice" in same.stderr


def test_progress_bar_on_a_terminal_and_in_a_log() -> None:
    tty = io.StringIO()
    bar = ProgressBar(tty, tty=True)
    bar.start("alice", 4)
    for _ in range(4):
        bar.advance()
    bar.finish()
    out = tty.getvalue()
    assert out.startswith("\r\x1b[Kalice [" + "." * 30 + "] 0/4")
    assert "alice [" + "#" * 30 + "] 4/4" in out and out.endswith("\r\x1b[K")

    log = io.StringIO()
    bar = ProgressBar(log, every=2, tty=False)
    bar.start("bob", 5)
    for _ in range(5):
        bar.advance()
    bar.finish()
    assert log.getvalue() == "bob: 2/5\nbob: 4/5\n"

"""Migration from a real Dovecot: mailbag must report exactly the UIDLs Dovecot reported.

Each test runs Dovecot from Debian's packages on loopback (own config and
port, see ``tests/dovecot.py``), records its UIDL and LIST listings over
POP3, stops it, runs ``mailbag migrate dovecot``, starts mailbag and
compares the listings byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MailbagServer, make_home
from tests.dovecot import PrivateDovecot, dovecot_unavailable
from tests.net.pop3raw import RawPop3

MAILBAG = [sys.executable, "-m", "mailbag"]

#: (subdir, file name, content): new and seen mail, Dovecot-style names with and
#: without size fields, flags, a bare Postfix-style name, CRLF and LF bodies.
ALICE_MAIL = [
    ("cur", "1700000000.M100P10.old,S=35,W=37:2,S", b"Subject: first\n\nread long ago\n"),
    ("cur", "1700000100.M5P11.old:2,RS", b"Subject: second\n\nreplied\n\n"),
    ("cur", "1700000200.V801I1234M5678.mx", b"Subject: third\r\n\r\nCRLF body\r\n"),
    ("new", "1700000300.M1P12.mx,S=30,W=32", b"Subject: fourth\n\nunread\n.dot\n"),
    ("new", "1700000400.M2P13.mx", b"Subject: fifth\n\n" + "中文".encode() + b"\n"),
]
BOB_MAIL = [
    ("new", "1700000500.M1P1.mx", b"Subject: bob\n\nhi bob\n"),
]


@pytest.fixture
def dovecot_factory() -> Iterator[list[PrivateDovecot]]:
    reason = dovecot_unavailable()
    if reason:
        pytest.skip(reason)
    made: list[PrivateDovecot] = []
    yield made
    for server in made:
        server.cleanup()


def start_dovecot(made: list[PrivateDovecot], **settings: object) -> PrivateDovecot:
    server = PrivateDovecot(**settings)  # type: ignore[arg-type]
    made.append(server)
    return server


def listings(port: int, user: str, password: str) -> tuple[bytes, bytes]:
    """The UIDL and LIST listings (after the +OK line) of one POP3 session."""
    pop = RawPop3("127.0.0.1", port)
    try:
        assert pop.cmd(f"USER {user}").startswith(b"+OK")
        reply = pop.cmd(f"PASS {password}")
        assert reply.startswith(b"+OK"), reply
        pop.send(b"UIDL\r\n")
        uidl = pop.multiline()
        pop.send(b"LIST\r\n")
        sizes = pop.multiline()
        assert pop.cmd("QUIT").startswith(b"+OK")
        return uidl, sizes
    finally:
        pop.close()


def migrate(
    home: MailbagServer, dovecot: PrivateDovecot, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAILBAG, "migrate", "dovecot", "-c", str(home.config),
         "--passwd-file", str(dovecot.passwd),
         "--maildir-template", f"maildir:{dovecot.mail}/%u/Maildir:LAYOUT=fs", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_migrate_dovecot_default_format_gives_identical_uidl_and_list(
    dovecot_factory: list[PrivateDovecot], tmp_path: Path
) -> None:
    dovecot = start_dovecot(dovecot_factory)  # pop3_uidl_format = %08Xu%08Xv
    alice = dovecot.add_user("alice@example.org", "alice-pw")
    bob = dovecot.add_user("bob", "bob-pw")
    for subdir, name, data in ALICE_MAIL:
        dovecot.put(alice, subdir, name, data)
    for subdir, name, data in BOB_MAIL:
        dovecot.put(bob, subdir, name, data)
    dovecot.start()
    before = {
        "alice@example.org": listings(dovecot.port, "alice@example.org", "alice-pw"),
        "bob": listings(dovecot.port, "bob", "bob-pw"),
    }
    dovecot.stop()
    assert before["alice@example.org"][0].count(b"\r\n") == len(ALICE_MAIL)
    assert (alice / "dovecot-uidlist").exists()

    home = make_home(tmp_path / "mailbag")
    mail_root = home.home / "mail"
    nothing_yet = files_under(mail_root)
    dry = migrate(home, dovecot, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout and "would be copied" in dry.stdout
    assert files_under(mail_root) == nothing_yet  # a dry run writes nothing

    first = migrate(home, dovecot)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "alice@example.org: account added; 5 messages, 5 copied" in first.stdout
    assert "5 Dovecot UIDLs kept" in first.stdout and "verified" in first.stdout
    assert "2 users, 6 messages (6 copied), 6 UIDLs kept from Dovecot, 0 failed" in first.stdout
    overrides = (home.maildir("alice@example.org") / "mailbag-uidl").read_bytes()

    home.start()
    try:
        for user, password in (("alice@example.org", "alice-pw"), ("bob", "bob-pw")):
            assert listings(home.port, user, password) == before[user], user
        # Running it again changes nothing and copies nothing.
        again = migrate(home, dovecot)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "account exists; 5 messages, 0 copied, 5 already there" in again.stdout
        assert (home.maildir("alice@example.org") / "mailbag-uidl").read_bytes() == overrides
        assert listings(home.port, "alice@example.org", "alice-pw") == before["alice@example.org"]
    finally:
        home.stop()
    for path in home.maildir("alice@example.org").rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert path.stat().st_mode & 0o777 == expected, path


def test_migrate_dovecot_saved_uidls_and_second_format(
    dovecot_factory: list[PrivateDovecot], tmp_path: Path
) -> None:
    # Dovecot first served with the default format and pop3_save_uidl = yes ...
    first = start_dovecot(dovecot_factory, save_uidl=True)
    carol = first.add_user("carol", "carol-pw")
    for subdir, name, data in ALICE_MAIL[:3]:
        first.put(carol, subdir, name, data)
    first.start()
    old_uidl, _ = listings(first.port, "carol", "carol-pw")
    first.stop()
    # ... then the administrator switched to %g; saved UIDLs must stay, new mail gets %g.
    second = start_dovecot(dovecot_factory, uidl_format="%g", save_uidl=True)
    second.passwd.write_text(first.passwd.read_text())
    os.rename(first.mail / "carol", second.mail / "carol")
    carol = second.mail / "carol" / "Maildir"
    for subdir, name, data in ALICE_MAIL[3:]:
        second.put(carol, subdir, name, data)
    second.start()
    uidl, sizes = listings(second.port, "carol", "carol-pw")
    second.stop()
    assert uidl.startswith(old_uidl)  # Dovecot kept the saved ones ...
    assert b"1700000400.M2P13.mx" in uidl  # ... and used %g for the new ones
    text = (carol / "dovecot-uidlist").read_text()
    assert " P" in text  # the uidlist really holds saved UIDLs (P fields)

    home = make_home(tmp_path / "mailbag")
    result = migrate(home, second, "--uidl-format", "%g", "--link")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(5 saved by pop3_save_uidl)" in result.stdout
    carol_mail = home.maildir("carol")
    messages = [*(carol_mail / "new").iterdir(), *(carol_mail / "cur").iterdir()]
    assert len(messages) == 5
    assert all(m.stat().st_nlink == 2 for m in messages)  # --link shares Dovecot's files
    home.start()
    try:
        assert listings(home.port, "carol", "carol-pw") == (uidl, sizes)
    finally:
        home.stop()

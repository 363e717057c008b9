"""``mailbag deliver``: the LDA an MTA pipes into, its sysexits codes and its headers.

Postfix (``mailbox_command``, ``pipe``) and other MTAs act on the exit code
alone (sysexits.h): 0 delivered, 67 bounce as unknown user, 65 bounce as a
data error, 73 bounce as "cannot create" (over quota), 75 defer and retry.
The first stderr line starts with the RFC 3463 code for the bounce text.
"""

from __future__ import annotations

import subprocess
import sys

from mailbag.auth.users import UsersFile
from tests.conftest import MailbagServer


def deliver(home: MailbagServer, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mailbag", "deliver", "-c", str(home.config), *args],
        input=stdin, capture_output=True, check=False, timeout=60,
    )


def stored(home: MailbagServer, user: str = "demo") -> list[bytes]:
    new = home.maildir(user) / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def test_deliver_exit_0_stores_exact_bytes_without_envelope(mailbag_home: MailbagServer) -> None:
    result = deliver(mailbag_home, "demo", stdin=b"Subject: hi\n\nbody\n")
    assert result.returncode == 0, result.stderr
    assert stored(mailbag_home) == [b"Subject: hi\n\nbody\n"]


def test_deliver_exit_0_envelope_flags_add_trace_headers(mailbag_home: MailbagServer) -> None:
    """-f gives Return-Path (RFC 5321 section 4.4), -a Delivered-To and Received."""
    result = deliver(mailbag_home, "-f", "s@example.org", "-a", "demo@example.org", "demo",
                     stdin=b"Subject: hi\n\nbody\n")
    assert result.returncode == 0, result.stderr
    [data] = stored(mailbag_home)
    lines = data.split(b"\n")
    assert lines[0] == b"Return-Path: <s@example.org>"
    assert lines[1] == b"Delivered-To: demo@example.org"
    assert lines[2] == b"Received: by localhost (mailbag deliver)"
    assert lines[3].startswith(b"\tfor <demo@example.org>; ")
    assert data.endswith(b"\nSubject: hi\n\nbody\n")


def test_deliver_null_sender_is_empty_return_path(mailbag_home: MailbagServer) -> None:
    """Bounces have the null reverse-path (RFC 5321 section 4.5.5): Postfix passes -f ''."""
    assert deliver(mailbag_home, "-f", "", "demo", stdin=b"S: b\n\nx\n").returncode == 0
    assert stored(mailbag_home)[0].startswith(b"Return-Path: <>\n")


def test_deliver_mbox_from_line_dropped(mailbag_home: MailbagServer) -> None:
    result = deliver(mailbag_home, "demo", stdin=b"From s@x Mon Jan  1 00:00:00 2024\nS: x\n\nb\n")
    assert result.returncode == 0
    assert stored(mailbag_home) == [b"S: x\n\nb\n"]


def test_deliver_exit_67_unknown_user(mailbag_home: MailbagServer) -> None:
    result = deliver(mailbag_home, "demo", "nobody", stdin=b"S: x\n\nb\n")
    assert result.returncode == 67
    assert result.stderr.startswith(b"5.1.1 ")
    assert stored(mailbag_home) == []  # all recipients are checked before any write


def test_deliver_exit_65_too_large_and_empty(mailbag_home: MailbagServer) -> None:
    text = mailbag_home.config.read_text()
    mailbag_home.config.write_text(text.replace("max_message_size = 52428800",
                                                "max_message_size = 100"))
    result = deliver(mailbag_home, "demo", stdin=b"S: x\n\n" + b"y" * 200)
    assert result.returncode == 65 and result.stderr.startswith(b"5.3.4 ")
    assert deliver(mailbag_home, "demo", stdin=b"").returncode == 65
    assert stored(mailbag_home) == []


def test_deliver_exit_75_storage_failure(mailbag_home: MailbagServer) -> None:
    """A Maildir that cannot be written: defer (EX_TEMPFAIL), the MTA retries."""
    path = mailbag_home.maildir()
    path.parent.mkdir(parents=True)
    path.write_text("not a directory")
    result = deliver(mailbag_home, "demo", stdin=b"S: x\n\nb\n")
    assert result.returncode == 75 and result.stderr.startswith(b"4.3.0 ")


def test_deliver_exit_73_over_quota_or_75_with_tempfail(mailbag_home: MailbagServer) -> None:
    """RFC 3463 X.2.2: bounce (73, EX_CANTCREAT) by default; defer (75) with quota.tempfail."""
    UsersFile(mailbag_home.home / "users").set_quota("demo", messages=1)
    assert deliver(mailbag_home, "demo", stdin=b"S: 1\n\nb\n").returncode == 0
    result = deliver(mailbag_home, "demo", stdin=b"S: 2\n\nb\n")
    assert result.returncode == 73 and result.stderr.startswith(b"5.2.2 <demo> Mailbox full")
    text = mailbag_home.config.read_text()
    mailbag_home.config.write_text(text.replace("tempfail = false", "tempfail = true"))
    result = deliver(mailbag_home, "demo", stdin=b"S: 2\n\nb\n")
    assert result.returncode == 75 and result.stderr.startswith(b"4.2.2 ")
    assert len(stored(mailbag_home)) == 1


def test_deliver_exit_78_bad_config(mailbag_home: MailbagServer) -> None:
    mailbag_home.config.write_text("[lmtp]\nlisten = [\"nonsense\"]\n")
    result = deliver(mailbag_home, "demo", stdin=b"S: x\n\nb\n")
    assert result.returncode == 78 and b"lmtp.listen" in result.stderr


def test_user_list_shows_usage_and_quota(mailbag_home: MailbagServer) -> None:
    """`mailbag user quota` sets limits; `user list` shows usage next to them."""
    config = str(mailbag_home.config)
    base = [sys.executable, "-m", "mailbag", "user"]
    subprocess.run([*base, "quota", "demo", "--bytes", "5000", "--messages", "10", "-c", config],
                   check=True, capture_output=True, timeout=60)
    assert deliver(mailbag_home, "demo", stdin=b"S: x\n\nb\n").returncode == 0
    out = subprocess.run([*base, "list", "-c", config], check=True, capture_output=True,
                         timeout=60).stdout.decode()
    assert out.split("\n")[1].split() == ["demo", "1", "11", "10", "5000"]

"""Dovecot formats without a Dovecot: uidlist parsing, pop3_uidl_format, locations, re-runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailbag.errors import ConfigError
from mailbag.migrate.dovecot import (
    UidlFormat,
    UidlistError,
    maildir_location,
    parse_uidlist,
)
from tests.conftest import make_home

UIDLIST = """\
3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1
25006 :1276528487.M364837P9451.kurkku,S=1355,W=1394:2,
25017 W2481 P0000627a4c0ac4b0 :1276533073.M242911P3632.kurkku
25018 P :1276533074.M1P1.kurkku
25019 G0123abcd :1276533075.M1P1.kurkku
"""


def test_uidlist_version3_records_and_ext_fields() -> None:
    uidlist = parse_uidlist(UIDLIST)
    assert (uidlist.version, uidlist.uidvalidity, uidlist.next_uid) == (3, 1275660208, 25022)
    first, saved, empty, guid = uidlist.records
    assert first.key == "1276528487.M364837P9451.kurkku,S=1355,W=1394"  # flags dropped
    assert saved.saved_uidl == "0000627a4c0ac4b0" and saved.ext["W"] == "2481"
    assert empty.saved_uidl == "1276533074.M1P1.kurkku"  # empty P: the base name
    assert first.saved_uidl is None and guid.guid == "0123abcd" and first.guid == first.key


def test_uidlist_version1_and_damage() -> None:
    uidlist = parse_uidlist("1 1000 3\n1 100.a.host:2,S\n2 101.b.host\n")
    assert [(r.uid, r.key) for r in uidlist.records] == [(1, "100.a.host"), (2, "101.b.host")]
    with pytest.raises(UidlistError, match=":3: UIDs not ascending"):
        parse_uidlist("3 V1 N3\n2 :a\n1 :b\n")
    with pytest.raises(UidlistError, match="no UIDVALIDITY"):
        parse_uidlist("3 N3\n")


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("%08Xu%08Xv", "000061ea4c0a0f30"),  # Dovecot's default; X is lower-case hex
        ("%u", "25066"),
        ("%v.%u", "1275727664.25066"),
        ("%g", "1276.M1P2.host,S=5"),
        ("%f", "1276.M1P2.host,S=5"),
        ("%Uf", "1276.M1P2.HOST,S=5"),
        ("%4.3f", ".M1"),
        ("%%%u", "%25066"),
        ("%Mu", "fa7fb9f1120429eafb496a431f96bc17"),  # md5("25066")
    ],
)
def test_uidl_format_expands_like_dovecot(fmt: str, expected: str) -> None:
    result = UidlFormat(fmt).expand(uid=25066, uidvalidity=1275727664,
                                    filename="1276.M1P2.host,S=5", guid="1276.M1P2.host,S=5")
    assert result == expected


@pytest.mark.parametrize(("fmt", "message"), [("%m", "mbox"), ("%x", "unknown variable"),
                                              ("%08X", "ends inside"), ("%Eu", "not supported")])
def test_uidl_format_refuses_what_it_cannot_reproduce(fmt: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UidlFormat(fmt)


def test_maildir_location_dovecot_and_mailbag_syntax() -> None:
    home = "/home/alice"
    assert maildir_location("maildir:~/Maildir:LAYOUT=fs", user="a@x.org", home=home) == \
        Path("/home/alice/Maildir")
    assert maildir_location("/var/vmail/%d/%n", user="a@X.org", home="") == \
        Path("/var/vmail/X.org/a")
    assert maildir_location("/var/vmail/%Ld/{local}", user="a@X.org", home="") == \
        Path("/var/vmail/x.org/a")
    with pytest.raises(ConfigError, match="home directory"):
        maildir_location("%h/Maildir", user="a", home="")


def test_migrate_rerun_keeps_served_uidls_and_reports_unlisted(tmp_path: Path) -> None:
    source = tmp_path / "dovecot" / "bob" / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (source / sub).mkdir(parents=True)
    (source / "cur" / "100.M1P1.h:2,S").write_bytes(b"Subject: a\n\nA\n")
    (source / "new" / "200.M1P1.h").write_bytes(b"Subject: b\n\nB\n")  # Dovecot never saw it
    (source / "dovecot-uidlist").write_text("3 V77 N2 Gx\n1 :100.M1P1.h\n")
    passwd = tmp_path / "passwd"
    passwd.write_text("bob:{CRAM-MD5}abcdef::::::\n")
    home = make_home(tmp_path / "home")

    def migrate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailbag", "migrate", "dovecot", "-c", str(home.config),
             "--passwd-file", str(passwd), "--maildir-template",
             str(tmp_path / "dovecot" / "%u" / "Maildir"), *args],
            capture_output=True, text=True, timeout=60, check=False)

    first = migrate()
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 never listed by Dovecot" in first.stdout
    assert "CRAM-MD5 is not supported" in first.stdout
    overrides = home.maildir("bob") / "mailbag-uidl"
    assert "100.M1P1.h 000000010000004d\n" in overrides.read_text()
    # A second run with another format must not change what mailbag already serves.
    second = migrate("--uidl-format", "%u")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already had a different migrated UIDL: kept" in second.stdout
    assert "100.M1P1.h 000000010000004d\n" in overrides.read_text()
    third = migrate("--uidl-format", "%u", "--replace-uidls")
    assert third.returncode == 0 and "100.M1P1.h 1\n" in overrides.read_text()
    unknown = migrate("--user", "nobody-here")
    assert unknown.returncode == 2 and "not in" in unknown.stderr

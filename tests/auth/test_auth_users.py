"""The users file: names, lookups, reloads, admin rewrites, concurrency, permissions."""

from __future__ import annotations

import logging
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailbag.auth.schemes import hash_password, verify_password
from mailbag.auth.scram import make_scram_secrets
from mailbag.auth.users import (
    UserDatabase,
    UserExists,
    UserRecord,
    UsersFile,
    authenticate,
    validate_username,
)
from mailbag.errors import AuthError, InvalidUsername, UnknownUser

from .conftest import CHEAP

# --- validate_username ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["alice", "alice@example.org", "a.b-c_d+e", "Ünïcødé", "用户", "x" * 255, "o'brien"],
)
def test_validate_username_accepts(name: str) -> None:
    assert validate_username(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../etc/passwd",
        "a/b",
        "a\\b",
        "a\x00b",
        "a\nb",
        "a\rb",
        "a\tb",
        "a b",
        "a\u00a0b",
        "a\u2028b",
        "a\x7fb",
        "a\u202eb",  # right-to-left override: a format character
        "a:b",
        ".hidden",
        "-rf",
        "#comment",
        "@example.org",
        "alice@",
        "x" * 256,
        "é" * 128,  # 256 octets in UTF-8
    ],
)
def test_validate_username_rejects(name: str) -> None:
    with pytest.raises(InvalidUsername):
        validate_username(name)


def test_validate_username_normalizes_nfc() -> None:
    assert validate_username("e\u0301") == "\u00e9"


# --- lookups ----------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def test_lookup_missing_file_means_no_users(users: UsersFile) -> None:
    assert users.lookup("alice") is None
    assert users.list() == []


def test_lookup_directory_raises_auth_error_naming_path(tmp_path: Path) -> None:
    users = UsersFile(tmp_path)
    with pytest.raises(AuthError, match=str(tmp_path)):
        users.lookup("alice")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_lookup_unreadable_raises_auth_error_naming_path(users_path: Path) -> None:
    _write(users_path, "alice:{PLAIN}x\n")
    users_path.chmod(0)
    with pytest.raises(AuthError, match=str(users_path)):
        UsersFile(users_path).lookup("alice")


def test_lookup_name_and_domain_resolution(users_path: Path) -> None:
    _write(
        users_path,
        "alice:{PLAIN}a\nbob@example.org:{PLAIN}b\ncarol@other.net:{PLAIN}c\n",
    )
    users = UsersFile(users_path, default_domain="Example.ORG")
    assert users.lookup("alice") is not None
    assert users.lookup("alice")  # exact
    alice = users.lookup("alice@EXAMPLE.org")  # default domain stripped
    assert alice is not None and alice.name == "alice"
    assert users.lookup("alice@other.net") is None
    bob = users.lookup("bob")  # default domain appended
    assert bob is not None and bob.name == "bob@example.org"
    assert users.lookup("bob@Example.Org") is bob  # domain case-insensitive
    assert users.lookup("Bob@example.org") is None  # local part is case-sensitive
    assert users.lookup("carol") is None
    carol = users.lookup("carol@OTHER.NET")
    assert carol is not None and carol.name == "carol@other.net"


def test_lookup_without_default_domain_exact_only(users_path: Path) -> None:
    _write(users_path, "alice:{PLAIN}a\nbob@example.org:{PLAIN}b\n")
    users = UsersFile(users_path)
    assert users.lookup("alice@example.org") is None
    assert users.lookup("bob") is None
    assert users.lookup("bob@example.org") is not None


@pytest.mark.parametrize("login", ["../alice", "alice\x00", "", "a:b", "."])
def test_lookup_invalid_login_finds_nothing(users_path: Path, login: str) -> None:
    _write(users_path, "alice:{PLAIN}a\n")
    assert UsersFile(users_path).lookup(login) is None


def test_lookup_reloads_when_file_changes(users_path: Path) -> None:
    _write(users_path, "alice:{PLAIN}one\n")
    users = UsersFile(users_path)
    first = users.lookup("alice")
    assert first is not None and verify_password("one", first.password)
    # Same size, possibly the same mtime tick: an atomic replace changes the inode.
    tmp = users_path.with_name("new")
    _write(tmp, "alice:{PLAIN}two\n")
    os.replace(tmp, users_path)
    second = users.lookup("alice")
    assert second is not None and verify_password("two", second.password)
    # An in-place edit that changes the size is seen too.
    _write(users_path, "alice:{PLAIN}three\nbob:{PLAIN}b\n")
    assert users.lookup("bob") is not None
    users_path.unlink()
    assert users.lookup("alice") is None


def test_lookup_sees_add_from_another_instance(users_path: Path) -> None:
    server = UsersFile(users_path)
    assert server.lookup("dave") is None
    UsersFile(users_path, argon2_params=CHEAP).add("dave", "pw")
    assert server.lookup("dave") is not None


def test_reload_explicit(users_path: Path) -> None:
    users = UsersFile(users_path)
    users.reload()
    assert users.list() == []


def test_parse_extra_fields_and_dovecot_columns(users_path: Path) -> None:
    scram = make_scram_secrets("pw").to_field()
    _write(
        users_path,
        f"alice:{{PLAIN}}pw:1000:1000:Alice A:/home/alice:/bin/false:"
        f"userdb_mail=maildir:~/Maildir scram={scram} apop=s3cr3t quota_bytes=1048576 "
        "quota_messages=100 nopassword\n"
        "bob:{PLAIN}b\n",
    )
    alice = UsersFile(users_path).lookup("alice")
    assert alice is not None
    assert alice.scram is not None and alice.scram.check_password("pw")
    assert alice.apop_secret == "s3cr3t"
    assert (alice.quota_bytes, alice.quota_messages) == (1048576, 100)
    bob = UsersFile(users_path).lookup("bob")
    assert bob == UserRecord("bob", "{PLAIN}b")


def test_parse_scram_password_field_gives_scram_secrets(users_path: Path) -> None:
    _write(users_path, f"alice:{make_scram_secrets('pw').to_field()}\n")
    alice = UsersFile(users_path).lookup("alice")
    assert alice is not None and alice.scram is not None
    assert verify_password("pw", alice.password)


def test_parse_bad_lines_skipped_with_warning_naming_line(
    users_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(
        users_path,
        "# users\n"
        "alice:{PLAIN}a\n"
        "../evil:{PLAIN}topsecret\n"
        "nopassword-field\n"
        "carol:{PLAIN}c::::::quota_bytes=lots\n"
        "dave:{PLAIN}d::::::scram=garbage\n"
        "alice:{PLAIN}duplicate\n"
        "erin:{PLAIN}e\r\n"
        "\n",
    )
    users = UsersFile(users_path)
    with caplog.at_level(logging.WARNING, logger="mailbag.auth.users"):
        assert [r.name for r in users.list()] == ["alice", "erin"]
    lines = {int(p.split(":")[-2]) for p in users.problems}
    assert lines == {3, 4, 5, 6, 7}
    assert all(str(users_path) in p for p in users.problems)
    assert "topsecret" not in caplog.text and "garbage" not in caplog.text
    assert ":3:" in caplog.text
    alice = users.lookup("alice")
    assert alice is not None and verify_password("a", alice.password)


def test_parse_non_utf8_line_skipped_and_preserved(users: UsersFile, users_path: Path) -> None:
    users_path.write_bytes(b"bad\xff:{PLAIN}x\nalice:{PLAIN}a\n")
    assert [r.name for r in users.list()] == ["alice"]
    users.add("bob", "pw")
    assert users_path.read_bytes().startswith(b"bad\xff:{PLAIN}x\nalice:{PLAIN}a\nbob:")


# --- admin operations -------------------------------------------------------------------------

FOREIGN = (
    "# mailbag users file\n"
    "\n"
    "legacy:{SHA512-CRYPT}$6$abc$xyz:1000:1000::/home/legacy::userdb_mail=mbox:~/mail\n"
    "not a valid line at all\n"
    "   # indented comment\n"
)


def test_add_passwd_del_list_round_trip_preserves_other_lines(
    users: UsersFile, users_path: Path
) -> None:
    _write(users_path, FOREIGN)
    alice = users.add("alice", "pw1", apop_secret="apop1")
    assert alice.name == "alice" and alice.scram is not None and alice.apop_secret == "apop1"
    assert users_path.read_text().startswith(FOREIGN)
    users.add("bob@example.org", "pw2", with_scram=False)
    assert [r.name for r in users.list()] == ["legacy", "alice", "bob@example.org"]

    changed = users.set_password("alice", "pw3")
    assert verify_password("pw3", changed.password)
    assert not verify_password("pw1", changed.password)
    assert changed.scram is not None and changed.scram.check_password("pw3")
    assert changed.apop_secret is None  # the old APOP secret must not outlive the password

    users.set_apop_secret("alice", "apop2")
    quota = users.set_quota("alice", bytes=5000, messages=7)
    assert (quota.quota_bytes, quota.quota_messages, quota.apop_secret) == (5000, 7, "apop2")
    users.set_quota("alice", messages=8)
    alice_now = users.lookup("alice")
    assert alice_now is not None
    assert (alice_now.quota_bytes, alice_now.quota_messages) == (None, 8)

    users.delete("alice")
    users.delete("bob@EXAMPLE.ORG")
    assert [r.name for r in users.list()] == ["legacy"]
    assert users_path.read_text() == FOREIGN


def test_set_quota_keeps_foreign_extra_fields(users: UsersFile, users_path: Path) -> None:
    _write(users_path, FOREIGN)
    users.set_quota("legacy", bytes=10)
    line = users_path.read_text().splitlines()[2]
    assert line == (
        "legacy:{SHA512-CRYPT}$6$abc$xyz:1000:1000::/home/legacy::"
        "userdb_mail=mbox:~/mail quota_bytes=10"
    )


def test_add_writes_dovecot_shape(users: UsersFile, users_path: Path) -> None:
    users.add("alice", "pw", apop_secret="s")
    (line,) = users_path.read_text().splitlines()
    name, password, uid, gid, gecos, home, shell, extra = line.split(":", 7)
    assert (name, uid, gid, gecos, home, shell) == ("alice", "", "", "", "", "")
    assert password.startswith("{ARGON2ID}$argon2id$")
    assert extra.split()[0].startswith("scram={SCRAM-SHA-256}4096,")
    assert extra.split()[1] == "apop=s"
    users.add("bob", "pw", with_scram=False)
    assert users_path.read_text().splitlines()[1].count(":") == 1


def test_add_existing_raises_user_exists(users: UsersFile) -> None:
    users.add("alice@example.org", "pw")
    with pytest.raises(UserExists):
        users.add("alice@Example.Org", "other")


@pytest.mark.parametrize("op", ["delete", "set_password", "set_quota", "set_apop_secret"])
def test_admin_op_unknown_user_raises(users: UsersFile, op: str) -> None:
    users.add("alice", "pw")
    with pytest.raises(UnknownUser):
        if op == "delete":
            users.delete("bob")
        elif op == "set_password":
            users.set_password("bob", "x")
        elif op == "set_quota":
            users.set_quota("bob", bytes=1)
        else:
            users.set_apop_secret("bob", "x")


def test_add_invalid_name_raises_before_writing(users: UsersFile, users_path: Path) -> None:
    with pytest.raises(InvalidUsername):
        users.add("../root", "pw")
    assert not users_path.exists()


def test_add_plain_password_with_colon_refused_b64_accepted(users: UsersFile) -> None:
    with pytest.raises(AuthError, match=r"PLAIN\.B64"):
        users.add("alice", "a:b", scheme="PLAIN")
    record = users.add("alice", "a:b", scheme="PLAIN.B64")
    assert verify_password("a:b", record.password)


def test_add_apop_secret_with_space_refused(users: UsersFile) -> None:
    with pytest.raises(AuthError):
        users.add("alice", "pw", apop_secret="two words")


def test_add_scram_scheme_stores_keys_in_password_field(users: UsersFile) -> None:
    record = users.add("alice", "pw", scheme="SCRAM-SHA-256")
    assert record.password.startswith("{SCRAM-SHA-256}")
    assert record.scram is not None and record.scram.check_password("pw")


def test_set_quota_negative_refused(users: UsersFile) -> None:
    users.add("alice", "pw")
    with pytest.raises(AuthError):
        users.set_quota("alice", bytes=-1)


def test_write_mode_0600_and_0640_kept(users: UsersFile, users_path: Path) -> None:
    users.add("alice", "pw")
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o600
    users_path.chmod(0o644)
    users.add("bob", "pw")
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o640
    assert users_path.with_name("users.lock").exists()


def test_write_failure_leaves_file_intact(
    users: UsersFile, users_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users.add("alice", "pw")
    before = users_path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(AuthError, match="No space left"):
        users.add("bob", "pw")
    monkeypatch.undo()
    assert users_path.read_bytes() == before
    assert sorted(p.name for p in users_path.parent.iterdir()) == ["users", "users.lock"]


def _add_many(path: str, worker: int, count: int) -> None:
    users = UsersFile(path, argon2_params=CHEAP)
    for i in range(count):
        users.add(f"user{worker}-{i}", "pw", with_scram=(i % 2 == 0))


def test_add_concurrent_processes_lose_nothing(users_path: Path) -> None:
    _write(users_path, "# header\n")
    workers, count = 4, 6
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_add_many, args=(str(users_path), w, count)) for w in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    names = {r.name for r in UsersFile(users_path).list()}
    assert names == {f"user{w}-{i}" for w in range(workers) for i in range(count)}
    assert users_path.read_text().startswith("# header\n")


# --- records, protocol, authenticate ----------------------------------------------------------


def test_user_record_repr_hides_secrets(users: UsersFile) -> None:
    record = users.add("alice", "hunter2", apop_secret="apopsecret", scheme="PLAIN")
    text = repr(record)
    assert "alice" in text
    assert "hunter2" not in text and "apopsecret" not in text
    assert record.scram is not None
    assert record.scram.stored_key.hex() not in text
    assert "{PLAIN}" not in text and "PLAIN" in text


def test_users_file_is_a_user_database(users: UsersFile) -> None:
    assert isinstance(users, UserDatabase)


def test_authenticate_right_wrong_unknown(users_path: Path) -> None:
    _write(users_path, f"alice:{hash_password('pw', argon2_params=CHEAP)}\n")
    users = UsersFile(users_path)
    record = authenticate(users, "alice", "pw")
    assert record is not None and record.name == "alice"
    assert authenticate(users, "alice", "wrong") is None
    assert authenticate(users, "nobody", "pw") is None
    assert authenticate(users, "../alice", "pw") is None


def test_authenticate_bad_hash_raises_auth_error(users_path: Path) -> None:
    _write(users_path, "alice:{NOPE}x\n")
    with pytest.raises(AuthError, match="NOPE"):
        authenticate(UsersFile(users_path), "alice", "pw")


def test_lookup_unstattable_path_raises_auth_error(tmp_path: Path) -> None:
    loop = tmp_path / "users"
    loop.symlink_to(loop)  # ELOOP: an OS error other than "missing"
    with pytest.raises(AuthError, match=str(loop)):
        UsersFile(loop).lookup("alice")


def test_auth_imports_no_higher_layer() -> None:
    code = (
        "import sys, mailbag.auth; "
        "print(' '.join(m for m in sys.modules if m.startswith('mailbag')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(out.stdout.split())
    allowed = {"mailbag", "mailbag.errors"}
    assert {m for m in modules if not m.startswith("mailbag.auth")} <= allowed

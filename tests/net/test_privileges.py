"""Started as root, the server binds, then runs as the configured account; root is refused
unless allowed; mail is created 0600/0700.  The drop tests need root (CI runs as root)."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MailbagServer, make_home
from tests.net.pop3raw import RawPop3

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")


@pytest.fixture
def account() -> Iterator[pwd.struct_passwd]:
    """A throwaway system user (useradd), or ``nobody`` when useradd is missing."""
    useradd = shutil.which("useradd")
    if useradd is None:
        yield pwd.getpwnam("nobody")
        return
    name = f"mbtest{secrets.token_hex(3)}"
    subprocess.run([useradd, "--system", "--user-group", "--no-create-home",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run([shutil.which("userdel") or "userdel", name], check=False,
                       capture_output=True)


@pytest.fixture
def open_home() -> Iterator[Path]:
    """A home the unprivileged account can reach (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="mailbag-priv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def proc_ids(pid: int) -> dict[str, list[int]]:
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(v) for v in value.split()]
    return ids


def configure(home: MailbagServer, **process: str | bool) -> None:
    text = home.config.read_text()
    for key, value in process.items():
        old = {"user": 'user = ""', "group": 'group = ""',
               "allow_root": "allow_root = true"}[key]
        new = f"{key} = {str(value).lower()}" if isinstance(value, bool) else f'{key} = "{value}"'
        text = text.replace(old, new, 1)
    home.config.write_text(text)


@needs_root
def test_serve_as_root_drops_to_configured_user_before_serving(
    account: pwd.struct_passwd, open_home: Path
) -> None:
    home = make_home(open_home / "home")
    configure(home, user=account.pw_name, allow_root=False)
    for path in (home.home / "mail", home.home / "users"):
        os.chown(path, account.pw_uid, account.pw_gid)
    home.start()  # binds 127.0.0.1 as root, then drops
    try:
        assert home.proc is not None
        ids = proc_ids(home.proc.pid)
        assert ids["Uid"] == [account.pw_uid] * 4  # real, effective, saved, filesystem
        assert ids["Gid"] == [account.pw_gid] * 4
        assert 0 not in ids["Groups"]
        assert "running-as" in home.log() and account.pw_name in home.log()

        pop = RawPop3(home.host, home.port)
        assert pop.cmd("USER demo").startswith(b"+OK")
        assert pop.cmd("PASS demo").startswith(b"+OK")  # creates the Maildir as the account
        assert pop.cmd("QUIT").startswith(b"+OK")
        pop.close()
        maildir = home.maildir()
        for path in (maildir.parent, maildir, *maildir.iterdir()):
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (account.pw_uid, account.pw_gid), path
            assert st.st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path
    finally:
        home.stop()


@needs_root
def test_serve_as_root_without_user_is_refused(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    configure(home, allow_root=False)
    result = subprocess.run([sys.executable, "-m", "mailbag", "serve", "-c", str(home.config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "refusing to serve as root" in result.stderr and "process.user" in result.stderr


def test_serve_not_root_cannot_switch_to_another_user(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    other = "root" if os.geteuid() != 0 else None
    if other is None:
        pytest.skip("needs a non-root user")
    configure(home, user=other)
    result = subprocess.run([sys.executable, "-m", "mailbag", "serve", "-c", str(home.config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "cannot switch users" in result.stderr


def test_serve_unknown_process_user_is_one_clear_line(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    configure(home, user="no-such-user-mailbag")
    result = subprocess.run([sys.executable, "-m", "mailbag", "serve", "-c", str(home.config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "mailbag: error: process.user: no such user 'no-such-user-mailbag'"
    )

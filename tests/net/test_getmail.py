"""getmail6, run for real: UIDL-based "leave on server", then delete after delivery.

getmail remembers which UIDLs it has seen (``read_all = false``), so a stable
UIDL is what keeps it from downloading a message twice; its ``delete`` option
is the DELE-then-QUIT path.  getmail refuses to write mail as root, so under
root (CI) the Maildir belongs to ``nobody`` and getmail switches to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MailbagServer

getmail = shutil.which("getmail")
pytestmark = pytest.mark.skipif(
    getmail is None, reason="getmail6 not installed (.ci/run installs it)"
)


@pytest.fixture
def getmail_home() -> Iterator[Path]:
    """A home for getmail that ``nobody`` can reach (pytest's tmp dirs are 0700 root)."""
    home = Path(tempfile.mkdtemp(prefix="mailbag-getmail-"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_getmail(server: MailbagServer, home: Path, *, delete: bool) -> str:
    maildir = home / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    as_nobody = ""
    if os.geteuid() == 0:
        shutil.chown(home, user="nobody")
        for path in [maildir, *maildir.iterdir()]:
            shutil.chown(path, user="nobody")
        as_nobody = "user = nobody\n"
    (home / "getmailrc").write_text(
        "[retriever]\ntype = SimplePOP3Retriever\n"
        f"server = {server.host}\nport = {server.port}\n"
        f"username = {server.user}\npassword = {server.password}\n"
        f"[destination]\ntype = Maildir\npath = {maildir}/\n{as_nobody}"
        f"[options]\nread_all = false\ndelete = {str(delete).lower()}\nverbose = 1\n"
    )
    assert getmail is not None
    result = subprocess.run(
        [getmail, "--getmaildir", str(home), "--rcfile", "getmailrc"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def delivered(home: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in (home / "Maildir" / "new").iterdir())


def test_getmail_keeps_mail_and_never_fetches_twice(
    mailbag_server: MailbagServer, getmail_home: Path
) -> None:
    for i in range(3):
        mailbag_server.deliver(b"Subject: %d\n\nbody %d\n" % (i, i))
    home = getmail_home
    assert "3 messages" in run_getmail(mailbag_server, home, delete=False)
    assert "0 messages" in run_getmail(mailbag_server, home, delete=False)
    mailbag_server.deliver(b"Subject: late\n\nlate body\n")
    assert "1 messages" in run_getmail(mailbag_server, home, delete=False)
    bodies = delivered(home)
    assert len(bodies) == 4 and any(b"late body" in b for b in bodies)


def test_getmail_delete_empties_the_maildrop(
    mailbag_server: MailbagServer, getmail_home: Path
) -> None:
    for i in range(2):
        mailbag_server.deliver(b"Subject: %d\n\nbody\n" % i)
    home = getmail_home
    run_getmail(mailbag_server, home, delete=True)
    assert len(delivered(home)) == 2
    assert not list((mailbag_server.maildir() / "new").iterdir())
    assert not list((mailbag_server.maildir() / "cur").iterdir())

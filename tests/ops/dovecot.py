"""A private Dovecot POP3 server for the migration tests, with a chosen ``pop3_uidl_format``.

Same approach as ``tests/client/pop3servers.py`` (own config, base_dir and
loopback port; Maildirs owned by the ``dovecot`` user when the tests run as
root, because Dovecot refuses mail access as root), but one instance per
test, because the UIDL format and ``pop3_save_uidl`` are server-wide
settings and are exactly what the tests vary.  Plain POP3 only: the
migration tests care about UIDL, not TLS.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dovecot_unavailable() -> str | None:
    """None if Dovecot can run here, else the reason to skip."""
    if not os.path.exists(DOVECOT):
        return "dovecot is not installed (apt-get install dovecot-pop3d)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("dovecot")
            pwd.getpwnam("dovenull")
        except KeyError:
            return "running as root but the dovecot/dovenull users do not exist"
    return None


class PrivateDovecot:
    """``dovecot -F`` on 127.0.0.1 serving ``root/mail/<user>/Maildir`` from a passwd-file."""

    def __init__(self, *, uidl_format: str = "%08Xu%08Xv", save_uidl: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailbag-migrate-dovecot-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("dovecot")
            self.owner = (pw.pw_uid, pw.pw_gid)
            mail_user, internal, login = "dovecot", "dovecot", "dovenull"
        else:
            mail_user = internal = login = pwd.getpwuid(os.geteuid()).pw_name
        self.mail = self.root / "mail"
        self.mail.mkdir()
        self._chown(self.mail)
        self.passwd = self.root / "passwd"
        self.passwd.write_text("")
        self.log = self.root / "dovecot.log"
        self.conf = self.root / "dovecot.conf"
        self.conf.write_text(f"""\
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = mailbag-migrate-{os.getpid()}-{self.port}
protocols = pop3
listen = 127.0.0.1
log_path = {self.log}
ssl = no
auth_mechanisms = plain
disable_plaintext_auth = no
default_internal_user = {internal}
default_login_user = {login}
mail_uid = {mail_user}
mail_gid = {mail_user}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{self.mail}/%u/Maildir
pop3_uidl_format = {uidl_format}
pop3_save_uidl = {"yes" if save_uidl else "no"}
passdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd}
}}
userdb {{
  driver = static
  args = home={self.mail}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def _chown(self, path: Path) -> None:
        if self.owner:
            os.chown(path, *self.owner)

    def add_user(self, name: str, password: str) -> Path:
        """A passwd-file line (``{PLAIN}``) and an empty Maildir; returns the Maildir."""
        with self.passwd.open("a") as f:
            f.write(f"{name}:{{PLAIN}}{password}::::::\n")
        maildir = self.mail / name / "Maildir"
        for path in (maildir.parent, maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
            path.mkdir(exist_ok=True)
            self._chown(path)
        return maildir

    def put(self, maildir: Path, subdir: str, name: str, data: bytes) -> None:
        """Drop a message file as a delivery agent would (tmp/ then rename)."""
        tmp = maildir / "tmp" / name.split(":", 1)[0]
        tmp.write_bytes(data)
        self._chown(tmp)
        os.rename(tmp, maildir / subdir / name)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"dovecot exited: {err} {self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("dovecot did not start listening")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

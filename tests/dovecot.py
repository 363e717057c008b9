"""A private Dovecot POP3 server for the tests (and the client benchmark).

``PrivateDovecot`` runs ``dovecot -F`` with its own config file, base_dir and
random 127.0.0.1 ports, serving the users of a ``{PLAIN}`` passwd-file from
Maildirs at ``root/mail/<user>/Maildir``.  Dovecot refuses to access mail as
root ("Mail access not allowed for root"), so when the tests run as root (CI)
the Maildirs belong to the ``dovecot`` system user (the tree lives in a 0755
temporary directory, since pytest's tmp_path is 0700 and unreachable for
that user); as a normal user everything runs as that user.

Options: a certificate for STLS and POP3S (plain POP3 only without one), the
server-wide ``pop3_uidl_format`` and ``pop3_save_uidl`` settings, the
``auth_mechanisms`` (SCRAM-SHA-256 and APOP work because the passdb holds
plaintext passwords), ``plaintext=False`` for ``disable_plaintext_auth`` (Dovecot
treats a connection whose two ends share an address as secure, so such a test
listens on another loopback address, ``listen="127.0.0.2"``), and users
declared before the start (Dovecot re-reads a passwd-file at most once a
second, so users added while it runs can fail to log in).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tests.conftest import free_port, wait_for_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


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


def drop(maildir: Path, subdir: str, name: str, data: bytes,
         owner: tuple[int, int] | None = None) -> None:
    """Drop a message file as a delivery agent would (tmp/ then rename into ``subdir``)."""
    tmp = maildir / "tmp" / name.split(":", 1)[0]
    tmp.write_bytes(data)
    if owner:
        os.chown(tmp, *owner)
    os.rename(tmp, maildir / subdir / name)


class PrivateDovecot:
    """``dovecot -F`` on 127.0.0.1 serving ``root/mail/<user>/Maildir`` from a passwd-file.

    ``tls`` is a (certificate, key) pair: with it the server also offers STLS
    and POP3S on ``tls_port``.  ``users`` are (name, password) pairs declared
    in the passwd-file up front; their Maildirs are made by ``maildir()``.
    """

    def __init__(self, *, tls: tuple[Path, Path] | None = None,
                 uidl_format: str = "%08Xu%08Xv", save_uidl: bool = False,
                 users: Iterable[tuple[str, str]] = (), mechanisms: str = "plain",
                 plaintext: bool = True, listen: str = "127.0.0.1") -> None:
        self.listen = listen
        self.root = Path(tempfile.mkdtemp(prefix="mailbag-dovecot-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
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
        self.passwd.write_text("".join(self._passwd_line(*user) for user in users))
        ssl = f"ssl = yes\nssl_cert = <{tls[0]}\nssl_key = <{tls[1]}" if tls else "ssl = no"
        self.log = self.root / "dovecot.log"
        self.conf = self.root / "dovecot.conf"
        self.conf.write_text(f"""\
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = mailbag-test-{os.getpid()}-{self.port}
protocols = pop3
listen = {listen}
log_path = {self.log}
{ssl}
auth_mechanisms = {mechanisms}
disable_plaintext_auth = {"no" if plaintext else "yes"}
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
  args = scheme=PLAIN username_format=%u {self.passwd}
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
    port = {self.tls_port}
    ssl = yes
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

    @staticmethod
    def _passwd_line(name: str, password: str) -> str:
        return f"{name}:{{PLAIN}}{password}::::::\n"

    def _chown(self, path: Path) -> None:
        if self.owner:
            os.chown(path, *self.owner)

    def add_user(self, name: str, password: str) -> Path:
        """A passwd-file line and an empty Maildir (before ``start()``); returns the Maildir."""
        with self.passwd.open("a") as f:
            f.write(self._passwd_line(name, password))
        return self.maildir(name)

    def maildir(self, name: str) -> Path:
        """The user's Maildir, made empty (with tmp/, new/, cur/) if it is not there yet."""
        maildir = self.mail / name / "Maildir"
        for path in (maildir.parent, maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
            path.mkdir(exist_ok=True)
            self._chown(path)
        return maildir

    def put(self, maildir: Path, subdir: str, name: str, data: bytes) -> None:
        drop(maildir, subdir, name, data, self.owner)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.listen, self.port, self.proc, what="dovecot")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} {self.log_text()}") from None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """Stop serving; the Maildirs, passwd-file and log stay for inspection."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        """Stop serving and remove everything."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

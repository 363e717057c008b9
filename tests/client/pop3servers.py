"""Real POP3 servers for the client's end-to-end tests (and the benchmark).

``Dovecot`` runs a private ``dovecot -F`` with its own config, base_dir,
random loopback ports, a ``{PLAIN}`` passwd-file and Maildirs it serves, with
a trustme certificate for STLS and POP3S.  Dovecot refuses to access mail as
root ("Mail access not allowed for root"), so when the tests run as root the
Maildirs belong to the ``dovecot`` system user (the tree lives in a 0755
temporary directory, since pytest's tmp_path is 0700 and unreachable for
that user); as a normal user everything runs as that user.

``Target`` is the one interface the tests use for either server: account
URL, password, CA file and ``deliver(bytes)`` (a Maildir drop into ``new/``,
the protocol every Maildir reader accepts).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
_COUNTER = itertools.count(1)


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dovecot_available() -> str | None:
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


@dataclass
class Target:
    """One mailbox on a running POP3 server, as the tests see it."""

    name: str
    host: str
    port: int
    tls_port: int
    user: str
    password: str
    ca: str
    maildir: Path
    owner: tuple[int, int] | None = None

    @property
    def url(self) -> str:
        return f"pop3://{self.user}@{self.host}:{self.port}"

    @property
    def url_tls(self) -> str:
        return f"pop3s://{self.user}@{self.host}:{self.tls_port}"

    def deliver(self, message: bytes) -> None:
        """Drop one message into the Maildir (tmp/ then rename into new/)."""
        name = f"{time.time_ns()}.T{next(_COUNTER)}P{os.getpid()}.test"
        tmp = self.maildir / "tmp" / name
        tmp.write_bytes(message)
        if self.owner:
            os.chown(tmp, *self.owner)
        os.rename(tmp, self.maildir / "new" / name)

    def messages_on_disk(self) -> int:
        return sum(len(os.listdir(self.maildir / d)) for d in ("new", "cur"))


class Dovecot:
    """A private Dovecot POP3 server; one instance serves many test users."""

    def __init__(self, certfile: Path, keyfile: Path, ca: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailbag-dovecot-"))
        self.root.chmod(0o755)
        self.port, self.tls_port = free_port(), free_port()
        self.ca = ca
        self.owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("dovecot")
            self.owner = (pw.pw_uid, pw.pw_gid)
            mail_user = "dovecot"
            internal, login = "dovecot", "dovenull"
        else:
            mail_user = internal = login = pwd.getpwuid(os.geteuid()).pw_name
        (self.root / "mail").mkdir()
        if self.owner:
            os.chown(self.root / "mail", *self.owner)
        # Dovecot re-reads a passwd-file at most once a second, so users made
        # on the fly can fail to log in: declare a pool up front instead.
        self.passwd = self.root / "passwd"
        self.passwd.write_text("".join(f"user{n}:{{PLAIN}}s3cret-{n}\n" for n in range(1, 501)))
        self._users = itertools.count(1)
        self.conf = self.root / "dovecot.conf"
        self.log = self.root / "dovecot.log"
        self.conf.write_text(f"""\
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = mailbag-test-{os.getpid()}-{self.port}
protocols = pop3
listen = 127.0.0.1
log_path = {self.log}
ssl = yes
ssl_cert = <{certfile}
ssl_key = <{keyfile}
auth_mechanisms = plain
disable_plaintext_auth = no
default_internal_user = {internal}
default_login_user = {login}
mail_uid = {mail_user}
mail_gid = {mail_user}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{self.root}/mail/%u
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd}
}}
userdb {{
  driver = static
  args = home={self.root}/mail/%u
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

    def add_user(self) -> Target:
        """A fresh user from the pool, with an empty Maildir."""
        n = next(self._users)
        name, password = f"user{n}", f"s3cret-{n}"
        maildir = self.root / "mail" / name
        for sub in ("", "tmp", "new", "cur"):
            (maildir / sub).mkdir(exist_ok=True)
            if self.owner:
                os.chown(maildir / sub, *self.owner)
        return Target("dovecot", "localhost", self.port, self.tls_port, name, password,
                      str(self.ca), maildir, self.owner)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

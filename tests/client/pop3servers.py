"""Real POP3 servers for the client's end-to-end tests (and the benchmark).

``Dovecot`` is the shared private Dovecot of ``tests/dovecot.py`` with a
trustme certificate for STLS and POP3S and a pool of users declared up
front, handing out one fresh mailbox per test.

``Target`` is the one interface the tests use for either server: account
URL, password, CA file and ``deliver(bytes)`` (a Maildir drop into ``new/``,
the protocol every Maildir reader accepts).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tests.dovecot import PrivateDovecot, dovecot_unavailable, drop

_COUNTER = itertools.count(1)

#: The name ``bench/client_fetch.py`` imports.
dovecot_available = dovecot_unavailable


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
        drop(self.maildir, "new", name, message, self.owner)

    def messages_on_disk(self) -> int:
        return sum(len(os.listdir(self.maildir / d)) for d in ("new", "cur"))


#: Dovecot re-reads a passwd-file at most once a second, so users made on the
#: fly can fail to log in: the tests take fresh ones from a pool declared up front.
POOL = tuple((f"user{n}", f"s3cret-{n}") for n in range(1, 501))
#: Every login the client speaks (the passdb has plaintext passwords, so all work).
MECHANISMS = "plain scram-sha-256 apop"


class Dovecot:
    """A private Dovecot with TLS; one instance serves many test users."""

    def __init__(self, certfile: Path, keyfile: Path, ca: Path) -> None:
        self.server = PrivateDovecot(tls=(certfile, keyfile), users=POOL,
                                     mechanisms=MECHANISMS)
        self.ca = ca
        self._pool = iter(POOL)

    def start(self) -> None:
        self.server.start()

    def add_user(self) -> Target:
        """A fresh user from the pool, with an empty Maildir."""
        name, password = next(self._pool)
        server = self.server
        return Target("dovecot", "localhost", server.port, server.tls_port, name, password,
                      str(self.ca), server.maildir(name), server.owner)

    def stop(self) -> None:
        """Stop the server and remove its files."""
        self.server.cleanup()

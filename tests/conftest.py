"""Shared fixtures: a real mailbag server process on loopback.

``mailbag_server`` starts ``python -m mailbag serve`` in a fresh home (config,
users file, Maildirs, self-signed certificate), on free ports of 127.0.0.1,
with user ``demo`` / password ``demo`` and cheap Argon2 parameters so tests
stay fast.  It yields a ``MailbagServer`` handle that can add users, deliver
messages (through the real ``mailbag deliver`` code path) and stop or kill
the process.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailbag.auth.schemes import Argon2Params
from mailbag.auth.users import UsersFile
from mailbag.cli.init_cmd import init_home

#: Cheap but real Argon2id, so hundreds of logins in the suite take seconds, not minutes.
TEST_ARGON2 = Argon2Params(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """A test that runs ``serve`` in-process sets the server's umask (077) for the whole
    pytest process; later files would then be unreadable to the unprivileged users
    that real servers (Dovecot's auth, a dropped mailbag) run as.  Restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


#: Ports handed out by ``free_port`` in this process: never handed out twice.
_GIVEN: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and stays free until the test's server binds it.

    ``bind(0)`` would pick from the kernel's ephemeral range, where every
    outgoing connection of the test run also takes its local port: a port
    found free could be taken by a client's connection before the server
    started (seen: ``address already in use`` in CI).  So the port comes from
    below the ephemeral range, which outgoing connections never use, is
    checked bindable, and is never handed out twice in one run.
    """
    top = _ephemeral_start()
    low = max(10_000, top - 12_000)
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, top)
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as sock:  # fall back to the kernel's choice
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 30,
                  what: str = "mailbag") -> None:
    """Wait until ``proc`` (the server called ``what``) accepts connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{what} exited early ({proc.returncode}): {err}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port}")


@dataclass
class MailbagServer:
    """Handle on a running server process."""

    home: Path
    config: Path
    host: str
    port: int
    tls_port: int
    user: str = "demo"
    password: str = "demo"
    proc: subprocess.Popen[bytes] | None = None
    extra_config: str = ""
    log_path: Path = field(default_factory=Path)
    #: LMTP (RFC 2033) listener of the same server, on loopback.
    lmtp_port: int = 0

    @property
    def cert(self) -> Path:
        return self.home / "tls" / "cert.pem"

    def add_user(self, name: str, password: str, *, apop: bool = False) -> None:
        users = UsersFile(self.home / "users", argon2_params=TEST_ARGON2)
        users.add(name, password, apop_secret=password if apop else None)

    def maildir(self, user: str | None = None) -> Path:
        return self.home / "mail" / (user or self.user) / "Maildir"

    def deliver(self, message: bytes, user: str | None = None) -> None:
        """Deliver through the real `mailbag deliver` command."""
        result = subprocess.run(
            [sys.executable, "-m", "mailbag", "deliver", "-c", str(self.config), user or self.user],
            input=message,
            capture_output=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailbag", "serve", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        wait_for_port(self.host, self.port, self.proc)
        if self.lmtp_port:
            wait_for_port(self.host, self.lmtp_port, self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code


def make_home(tmp: Path, extra_config: str = "", *, workers: int = 1) -> MailbagServer:
    """A fresh home; ``workers=1`` keeps the classic single process (tests/net/test_workers.py
    runs several)."""
    port, tls_port, lmtp_port = free_port(), free_port(), free_port()
    config = init_home(
        tmp,
        hostname="localhost",
        listen=(f"127.0.0.1:{port}",),
        listen_tls=(f"127.0.0.1:{tls_port}",),
    )
    text = config.read_text()
    text = text.replace('workers = "auto"', f"workers = {workers}")
    text = text.replace("failure_delay = 2.0", "failure_delay = 0.2")
    text = text.replace("max_failure_delay = 15.0", "max_failure_delay = 0.5")
    if os.geteuid() == 0:
        # CI runs as root; serving as root must be asked for explicitly.
        text = text.replace("allow_root = false", "allow_root = true")
    text = re.sub(r"(\n\[lmtp\]\n(?:#[^\n]*\n)*)listen = \[\]",
                  rf'\1listen = ["127.0.0.1:{lmtp_port}"]', text, count=1)
    config.write_text(text + "\n" + extra_config)
    server = MailbagServer(
        home=tmp, config=config, host="127.0.0.1", port=port, tls_port=tls_port,
        extra_config=extra_config, log_path=tmp / "server.log", lmtp_port=lmtp_port,
    )
    server.add_user("demo", "demo", apop=True)
    return server


@pytest.fixture
def mailbag_home(tmp_path: Path) -> MailbagServer:
    """A configured home whose server is not started yet."""
    return make_home(tmp_path / "home")


@pytest.fixture
def mailbag_server(mailbag_home: MailbagServer) -> Iterator[MailbagServer]:
    """A running mailbag server (user demo/demo) on loopback."""
    mailbag_home.start()
    try:
        yield mailbag_home
    finally:
        mailbag_home.stop()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NO_COLOR", "1")

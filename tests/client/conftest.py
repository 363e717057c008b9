"""Fixtures for the client tests: a private Dovecot, the mailbag server, a CLI runner.

``pop3`` is parametrized over both servers, so every end-to-end test proves
the client against two independent implementations.  Dovecot is skipped
with a reason when it is not installed; the mailbag server fixture comes
from ``tests/conftest.py``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from mailbag.cli.main import main
from tests.client.pop3servers import Dovecot, Target
from tests.dovecot import dovecot_unavailable


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(cert, key, ca) from trustme for localhost/127.0.0.1."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    directory = tmp_path_factory.mktemp("tls")
    certfile, keyfile, cafile = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    return certfile, keyfile, cafile


@pytest.fixture(scope="session")
def dovecot(tls_files: tuple[Path, Path, Path]) -> Iterator[Dovecot]:
    """One private Dovecot for the whole session (each test gets its own user)."""
    reason = dovecot_unavailable()
    if reason:
        pytest.skip(reason)
    server = Dovecot(*tls_files)
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        pytest.skip(f"dovecot would not start here: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["mailbag", "dovecot"])
def pop3(request: pytest.FixtureRequest) -> Target:
    """A fresh, empty mailbox on a real server: mailbag or Dovecot."""
    if request.param == "dovecot":
        server: Dovecot = request.getfixturevalue("dovecot")
        return server.add_user()
    mb = request.getfixturevalue("mailbag_server")
    # A user whose password is not its name (login tests look for it on the wire),
    # with an APOP secret so every login the server offers works.
    user, password = "reader", "r3ader-Secret"
    mb.add_user(user, password, apop=True)
    maildir = mb.maildir(user)
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    return Target("mailbag", "localhost", mb.port, mb.tls_port, user, password,
                  str(mb.cert), maildir)


@pytest.fixture
def dovecot_box(dovecot: Dovecot) -> Target:
    """A fresh mailbox on Dovecot only (interop-specific tests)."""
    return dovecot.add_user()


@pytest.fixture(autouse=True)
def _client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read the developer's ~/.netrc or history; fixed width output."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("MAILBAG_ACCOUNT", raising=False)
    monkeypatch.delenv("MAILBAG_PASSWORD", raising=False)
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")


@dataclass
class Result:
    code: int
    out: str
    err: str
    raw: bytes


Run = Callable[..., Result]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run ``mailbag mail ...`` in-process against a Target, password from the env."""

    def run(target: Target | None, *args: str, password: str | None = None,
            tls: bool = False) -> Result:
        argv = ["mail", *args]
        if target is not None:
            monkeypatch.setenv("MAILBAG_PASSWORD", password or target.password)
            argv[1:1] = ["-a", target.url_tls if tls else target.url, "--ca", target.ca]
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        err = io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
        out.flush()
        data = raw.getvalue()
        return Result(code, data.decode("utf-8", "replace"), err.getvalue(), data)

    return run

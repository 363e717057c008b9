"""PostgreSQL for tests: a fresh, throw-away database per test.

The server is ``MAILBAG_TEST_PG`` (a libpq URI of a role that may create
databases), by default ``postgresql://postgres@127.0.0.1:5432/postgres``
with trust authentication, as on the project's machines and in CI
(``.ci/run`` installs and starts one).  When none is reachable the tests
that need one are skipped with a reason saying so; in CI that never happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

ADMIN_DSN = os.environ.get("MAILBAG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def dsn_for(database: str, admin: str = ADMIN_DSN) -> str:
    """The admin DSN with its database name replaced."""
    parts = urlsplit(admin)
    return urlunsplit(parts._replace(path="/" + database))


async def _admin(sql: str, admin: str = ADMIN_DSN) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@functools.cache
def unavailable_reason() -> str | None:
    """None when PostgreSQL is reachable, else why not (for ``pytest.skip``)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[test]')"
    try:
        asyncio.run(_admin("SELECT 1"))
    except Exception as exc:
        return f"no PostgreSQL reachable at {ADMIN_DSN} ({type(exc).__name__}: {exc})"
    return None


def require_postgres() -> None:
    """Skip the calling test, with the reason, when no PostgreSQL is reachable."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@contextmanager
def fresh_database(*, initialise: bool = True, admin: str = ADMIN_DSN) -> Iterator[str]:
    """Create a database with a random name (schema applied), yield its DSN, drop it."""
    if admin == ADMIN_DSN:
        require_postgres()
    name = f"mailbag_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"', admin))
    dsn = dsn_for(name, admin)
    try:
        if initialise:
            from mailbag.database import schema
            from mailbag.database.pool import Database

            async def init() -> None:
                db = Database(dsn, min_size=0, max_size=1)
                try:
                    await schema.upgrade(db)
                finally:
                    await db.close()

            asyncio.run(init())
        yield dsn
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin))


PG_BIN = os.environ.get("MAILBAG_PG_BIN", "/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A PostgreSQL server of our own in a temporary directory, on a loopback port.

    For tests that stop and start the database (outages, failover): the
    shared server must never be stopped.  Run as the ``postgres`` account
    when we are root (PostgreSQL refuses to run as root).
    """

    def __init__(self) -> None:
        import shutil
        import subprocess
        import tempfile

        self._subprocess = subprocess
        if not os.path.exists(os.path.join(PG_BIN, "initdb")):
            pytest.skip(f"no initdb in {PG_BIN} (set MAILBAG_PG_BIN)")
        self.root = tempfile.mkdtemp(prefix="mailbag-pg-")
        self.data = os.path.join(self.root, "data")
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root)
                pytest.skip("running as root and there is no postgres account")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            os.chmod(self.root, 0o755)
            self._as = ["runuser", "-u", "postgres", "--"]
        from tests.conftest import free_port  # outside the ephemeral range, see there

        self.port = free_port()
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self.admin_dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        self._subprocess.run(
            [*self._as, os.path.join(PG_BIN, tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
            cwd=self.root,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l",
                  os.path.join(self.root, "log"), "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        """Stop; ``immediate`` is the closest to a crash that still leaves the files usable."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        import shutil

        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

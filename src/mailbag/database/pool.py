"""A small asyncpg pool per node, created lazily, that survives database outages.

Why a pool and not a connection per session: a node may serve tens of
thousands of idle POP3 sessions, and PostgreSQL spends a process per
connection.  Every database operation here borrows a connection for the
duration of one statement or one transaction and gives it back at once, so a
node needs ``max_size`` connections (10-20) however many sessions it holds.

Outages: every driver failure (refused connection, lost connection, server
shutting down, a read-only server after a failover, a timeout) becomes the
caller's error family, ``StorageError`` for storage (POP3 ``-ERR [SYS/TEMP]``,
LMTP ``451 4.3.0``) and ``AuthError`` for users.  asyncpg's pool replaces a
dead connection on the next acquire, so when the database returns the node
carries on without a restart.  A multi-host DSN with
``target_session_attrs=read-write`` makes each new connection look for the
current primary, which is how a node follows a failover.

The pool belongs to the event loop that created it; a store used from a new
loop (tests run each case under ``asyncio.run``) gets a fresh pool.

Durability is per kind of write.  A statement on its own (``connection``)
commits with ``synchronous_commit = off``: such writes are leases, login
failure counters, known networks and empty maildrop rows, state that is
either re-created as needed or safe to lose in a crash (a lost lease only
makes its session's QUIT refuse to commit; a lost lease release expires).
Waiting for the WAL flush (and a synchronous standby) on each of them cost
two flushes per POP3 session.  Everything that must survive a crash, mail
delivered, deletions, users, the schema, runs in ``transaction``, which
commits with ``synchronous_commit = on`` (flushed, and confirmed by the
synchronous standbys when ``synchronous_standby_names`` is set), whatever
the pool's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg

from mailbag.config import DatabaseSettings
from mailbag.errors import ConfigError, MailbagError, StorageError

log = logging.getLogger(__name__)

#: A connection from the pool (asyncpg ships no type information).
Connection = Any

DEFAULT_MIN_SIZE = 2
DEFAULT_MAX_SIZE = 10
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_COMMAND_TIMEOUT = 30.0

#: Failures that mean "the database is not usable right now" (retry later).
DRIVER_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


def describe(exc: BaseException) -> str:
    """A one-line description for logs; never includes query parameters."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{name}: {text}" if text else name


@contextlib.contextmanager
def failures_as(error: type[MailbagError], action: str) -> Iterator[None]:
    """Turn driver failures into ``error``; our own errors pass through unchanged."""
    try:
        yield
    except MailbagError:
        raise
    except DRIVER_FAILURES as exc:
        raise error(f"database: cannot {action}: {describe(exc)}") from exc


#: Every Database with a pool, so ``close_all`` can close them at shutdown.
_open: weakref.WeakSet[Database] = weakref.WeakSet()


async def close_all() -> None:
    """Close every pool that belongs to the running loop (shutdown; end of a test)."""
    loop = asyncio.get_running_loop()
    for db in list(_open):
        if db._loop is loop:
            await db.close()


class Database:
    """A lazily created connection pool with failures mapped to one error family.

    ``dsn`` is a libpq URI or key/value string, several hosts allowed
    (``postgresql://db1,db2/mailbag?target_session_attrs=read-write``).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        error: type[MailbagError] = StorageError,
        application_name: str = "mailbag",
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(f"pool sizes need 0 <= min <= max, max >= 1: {min_size}, {max_size}")
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.error = error
        self.application_name = application_name
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._creating: asyncio.Lock | None = None

    def __repr__(self) -> str:
        # The DSN may carry a password: never show it.
        return f"Database(pool {self.min_size}-{self.max_size})"

    async def _get_pool(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._forget_pool()
            self._loop = loop
            self._creating = asyncio.Lock()
        if self._pool is not None:
            return self._pool
        assert self._creating is not None
        async with self._creating:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    server_settings={"application_name": self.application_name,
                                     "synchronous_commit": "off"},
                    reset=_keep_session,
                )
                _open.add(self)
        return self._pool

    def _forget_pool(self) -> None:
        """Drop a pool whose loop is gone (its sockets die with that loop)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(
        self, action: str, *, error: type[MailbagError] | None = None
    ) -> AsyncIterator[Connection]:
        """Borrow a connection for one short piece of work.

        Failures become ``error`` (default ``self.error``): one pool serves
        storage (``StorageError``) and users (``AuthError``) alike.
        """
        with failures_as(error or self.error, action):
            pool = await self._get_pool()
            async with pool.acquire(timeout=self.connect_timeout + self.command_timeout) as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def transaction(
        self, action: str, *, error: type[MailbagError] | None = None
    ) -> AsyncIterator[Connection]:
        """A connection inside one transaction: committed on success, rolled back otherwise.

        A cancelled task rolls back too (asyncpg resets a connection that was
        interrupted mid-query before the pool hands it out again), so a
        dropped POP3 session never commits half of anything.

        ``BEGIN`` and ``SET LOCAL synchronous_commit = on`` travel in one
        round trip (a simple query), so a durable transaction costs no more
        than asyncpg's own ``conn.transaction()``.
        """
        async with self.connection(action, error=error) as conn:
            with failures_as(error or self.error, action):
                await conn.execute("BEGIN; SET LOCAL synchronous_commit = on")
                try:
                    yield conn
                except BaseException:
                    if not conn.is_closed() and conn.is_in_transaction():
                        # If this fails (a query was cut mid-way), the pool's reset
                        # rolls back before the connection is used again.
                        with contextlib.suppress(Exception):
                            await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")

    async def close(self) -> None:
        """Close the pool gracefully (at shutdown); the next use opens a new one."""
        pool, self._pool = self._pool, None
        if pool is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(*DRIVER_FAILURES):
                await asyncio.wait_for(pool.close(), timeout=self.connect_timeout)
                return
        if pool is not None:
            with contextlib.suppress(Exception):  # its loop may be closed already
                pool.terminate()


def shared_settings(settings: object) -> DatabaseSettings:
    """``settings`` if it is the ``[database]`` section (defaults for None), else ConfigError.

    A backend chosen by name receives it from the wiring; a ``database`` key
    written in ``[storage]`` instead arrives as a plain value and is refused.
    """
    if settings is None:
        return DatabaseSettings()
    if not isinstance(settings, DatabaseSettings):
        raise ConfigError("storage.database: the postgres backend takes its settings from "
                          "the [database] section, not from [storage]")
    return settings


_shared: dict[tuple[object, ...], Database] = {}


def shared_database(settings: DatabaseSettings) -> Database:
    """The node's one pool for ``settings`` (the ``[database]`` section).

    Storage and users share it, and a SIGHUP that changes nothing in
    ``[database]`` gets the same pool back instead of opening a second one.
    """
    if not settings.dsn:
        raise ConfigError("database.dsn: the postgres backends need a dsn ([database] dsn)")
    key = (settings.dsn, settings.pool_min_size, settings.pool_max_size,
           settings.connect_timeout, settings.command_timeout)
    found = _shared.get(key)
    if found is None:
        found = _shared[key] = Database(
            settings.dsn,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
        )
    return found


async def _keep_session(conn: Any) -> None:
    """Pool release without asyncpg's default reset query (one round trip per release).

    asyncpg still rolls back a transaction left open before calling this;
    mailbag sets no session state (no SET, LISTEN, cursors or advisory lock
    outside ``db upgrade``, which unlocks its own), so there is nothing else
    to reset, and a session's three pool checkouts save three round trips.
    """

"""A small connection pool of our own per node, created lazily, that survives outages.

Why a pool and not a connection per session: a node may serve tens of
thousands of idle POP3 sessions, and PostgreSQL spends a process per
connection.  Every database operation here borrows a connection for the
duration of one statement or one transaction and gives it back at once, so a
node needs ``max_size`` connections (10-20) however many sessions it holds.

Why not asyncpg's ``Pool``: a POP3 session borrows once or twice, and
asyncpg's acquire and release (``wait_for`` with a timeout, an
``asyncio.Queue``, a holder and a proxy per borrow, release bookkeeping),
wrapped in two generator context managers, cost 25-35 µs of CPU per borrow,
a fifth of a maildrop open.  Here a borrow that finds an idle connection is
a ``list.pop`` and its return a ``list.append``; the timeout, the future and
the FIFO of waiters exist only when all ``max_size`` connections are lent.
The connections are plain ``asyncpg.connect`` ones, and a borrower gets the
connection itself (no proxy): it must not keep it past its ``async with``.

Outages: every driver failure (refused connection, lost connection, server
shutting down, a read-only server after a failover, a timeout) becomes the
caller's error family, ``StorageError`` for storage (POP3 ``-ERR [SYS/TEMP]``,
LMTP ``451 4.3.0``) and ``AuthError`` for users.  A dead connection is never
lent again (an idle one is checked with ``is_closed()`` when taken, a lent
one when it comes back) and its place goes to a new connection on the next
borrow, so when the database returns the node carries on without a restart.
A multi-host DSN with ``target_session_attrs=read-write`` makes each new
connection look for the current primary, which is how a node follows a
failover.

Session state: mailbag sets none (no SET, LISTEN, cursors or advisory lock
outside ``db upgrade``, which unlocks its own), so a connection returned in
a clean state needs no reset query, which saves a round trip per borrow.  A
borrow that ended in anything but a plain server-side error (a cancelled
task, a timeout, a lost connection) may have left a query half-way: that
connection is closed instead of reused (``_Pool.retire``: its cut query is
cancelled on the server first), and so is one still inside a transaction.
Those exits are rare; a new connection is cheaper than reasoning about the
state a cut query left.

The pool belongs to the event loop that created it; a store used from a new
loop (tests run each case under ``asyncio.run``) gets a fresh pool and the
old one's sockets are terminated.

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
from collections import deque
from collections.abc import Coroutine, Iterator
from types import TracebackType
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
#: Seconds an idle connection beyond ``min_size`` may stay open (asyncpg's
#: ``max_inactive_connection_lifetime``): after a burst, a node gives the
#: database its processes back.
IDLE_LIFETIME = 300.0

#: Failures that mean "the database is not usable right now" (retry later).
DRIVER_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

BEGIN = "BEGIN; SET LOCAL synchronous_commit = on"


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


def _is_driver_failure(exc: BaseException) -> bool:
    """What ``failures_as`` translates (our own errors pass through)."""
    return isinstance(exc, DRIVER_FAILURES) and not isinstance(exc, MailbagError)


def _clean_exit(exc: BaseException) -> bool:
    """May a connection whose borrow raised ``exc`` be lent again?

    Yes after a plain server-side error (the server answered and the session
    goes on: the protocol is in step) and after our own errors raised between
    queries (``MessageGone``, ``UnknownUser``, ``LeaseLost``...), unless one
    of those was itself caused by a driver failure of another kind.  No after
    anything else: a cancellation or a timeout may have cut a query half-way,
    and a ``FATAL`` error or a connection-class one (SQLSTATE 08) means the
    server ended the session, which ``is_closed()`` may not show yet.
    Whether a transaction is still open is checked separately.
    """
    while isinstance(exc, MailbagError):
        cause = exc.__cause__ if exc.__cause__ is not None else exc.__context__
        if cause is None:
            return True
        exc = cause
    if not isinstance(exc, asyncpg.PostgresError) or isinstance(
            exc, asyncpg.PostgresConnectionError):
        return False
    severity = getattr(exc, "severity_en", None) or getattr(exc, "severity", None)
    return severity not in ("FATAL", "PANIC")


#: Every Database with a pool, so ``close_all`` can close them at shutdown.
_open: weakref.WeakSet[Database] = weakref.WeakSet()


async def close_all() -> None:
    """Close every pool that belongs to the running loop (shutdown; end of a test)."""
    loop = asyncio.get_running_loop()
    for db in list(_open):
        pool = db._pool
        if pool is not None and pool.loop is loop:
            await db.close()


class _Pool:
    """The connections of one ``Database`` on one event loop.

    ``size`` counts every slot taken: connections idle, lent, being opened or closed.
    It never exceeds ``max_size``.  A borrower that finds no idle connection
    and no free slot waits in ``waiters`` (FIFO); a returned connection, or a
    slot freed by a connection that was closed or failed to open, goes to
    the first waiter still waiting (a slot is handed over as ``None``: the
    waiter opens a connection in it).  Idle connections are a stack: the most
    recently returned is lent first, so the ones at the bottom are those
    nobody needed lately, which ``_sweep`` closes beyond ``min_size``.
    """

    __slots__ = (
        "closed",
        "closing",
        "db",
        "everyone",
        "idle",
        "loop",
        "low",
        "opening",
        "size",
        "timer",
        "waiters",
    )

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop) -> None:
        self.db = db
        self.loop = loop
        self.idle: list[Connection] = []
        self.size = 0
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        #: Every open connection, idle or lent, to terminate them with the pool.
        self.everyone: set[Connection] = set()
        self.closed = False
        #: The fewest idle connections since the last sweep (see ``_sweep``).
        self.low = 0
        #: Connections being opened (warm-up) and closed in the background.
        self.opening: set[asyncio.Task[None]] = set()
        self.closing: set[asyncio.Task[None]] = set()
        self.timer = loop.call_later(IDLE_LIFETIME, self._sweep)

    # -- the fast path ----------------------------------------------------------

    def take(self) -> Connection | None:
        """An idle connection that is still open, or None (then ``acquire``)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if len(idle) < self.low:
                self.low = len(idle)
            if not conn.is_closed():
                return conn
            self._drop(conn)  # lost while idle (server restart, pg_terminate_backend)
        return None

    def put(self, conn: Connection, exc: BaseException | None) -> bool:
        """Take back a lent connection; ``exc`` is what its borrow raised, if anything.

        False when it must not be lent again: then the caller ``retire``s it.
        """
        if ((exc is not None and not _clean_exit(exc)) or conn.is_closed()
                or conn.is_in_transaction() or self.closed):
            return False
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        self.idle.append(conn)
        return True

    # -- the slow path ----------------------------------------------------------

    async def acquire(self) -> Connection:
        """A connection when none is idle: open one in a free slot, or wait for one."""
        db = self.db
        if self.closed:
            raise asyncpg.InterfaceError("the connection pool is closed")
        if self.size < db.max_size:
            if self.size == 0:
                self._warm_up()
            self.size += 1
            return await self._open(db.connect_timeout)
        limit = db.connect_timeout + db.command_timeout
        deadline = self.loop.time() + limit
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                got = await waiter
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"no connection free within {limit:g} s "
                                   f"({db.max_size} lent)") from None
            raise
        if got is not None:
            return got
        # A slot was handed over: open a connection in it, within what is left.
        return await self._open(min(db.connect_timeout, max(deadline - self.loop.time(), 0.1)))

    def _abandon(self, waiter: asyncio.Future[Connection | None]) -> None:
        """A waiter gave up (cancelled, timed out): pass on what it was handed, if anything."""
        if not waiter.done():
            waiter.cancel()
        if waiter.cancelled():
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
        elif waiter.exception() is None:  # handed over as the waiter was cancelled
            got = waiter.result()
            if got is None:
                self._free_slot()
            elif not self.put(got, None):
                self._retire_soon(got)

    async def _open(self, timeout: float) -> Connection:
        """Open a connection in a slot already counted in ``size``; free it on failure."""
        db = self.db
        try:
            conn = await asyncpg.connect(
                db.dsn,
                timeout=timeout,
                command_timeout=db.command_timeout,
                server_settings={"application_name": db.application_name,
                                 "synchronous_commit": "off"},
            )
        except BaseException:
            self._free_slot()
            raise
        self.everyone.add(conn)
        return conn

    def _warm_up(self) -> None:
        """Open ``min_size - 1`` connections in the background (the borrower opens one).

        Done when a borrow finds the pool empty: at first use, and after an
        outage took every connection.  In the background, so that no borrow
        waits for connections it does not use, and a warm-up failure (the
        database refusing more connections, say) fails no borrow; the
        borrower's own connection reports an outage.  asyncpg's pool opened
        ``min_size`` before its first acquire returned.
        """
        for _ in range(min(self.db.min_size, self.db.max_size) - 1):
            self.size += 1
            self._spawn(self.opening, self._open_idle())

    async def _open_idle(self) -> None:
        try:
            conn = await self._open(self.db.connect_timeout)
        except Exception as exc:
            log.debug("database: cannot open a spare connection: %s", describe(exc))
            return
        if not self.put(conn, None):  # the pool was closed meanwhile
            await self.retire(conn)

    def _spawn(self, tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def retire(self, conn: Connection) -> None:
        """Close a connection that must not be lent again, then free its slot.

        Gracefully: ``close`` first lets asyncpg send the cancel request of a
        query cut by a cancellation or a timeout (a plain ``terminate`` would
        leave it running on the server, holding its locks), then says
        goodbye, so the server ends any transaction left open at once.  The
        slot stays taken meanwhile, so the server never sees more than
        ``max_size`` connections from this pool.  The borrower whose exit was
        bad waits for this (a few milliseconds, as in asyncpg's pool), so a
        task cancelled at shutdown leaves nothing running behind it.
        """
        if conn.is_closed():
            self._drop(conn)
            return
        try:
            await conn.close(timeout=self.db.connect_timeout)
        except Exception as exc:  # it is closed (aborted) whatever happened
            log.debug("database: a connection did not close cleanly: %s", describe(exc))
        finally:
            self._drop(conn)

    def _retire_soon(self, conn: Connection) -> None:
        """``retire`` in the background, where nobody can wait (sweeps, abandoned hand-overs)."""
        self._spawn(self.closing, self.retire(conn))

    def _drop(self, conn: Connection) -> None:
        """Forget a connection that is closed (or must die now) and free its slot."""
        self.everyone.discard(conn)
        with contextlib.suppress(Exception):  # its loop may be closed (``terminate``)
            conn.terminate()
        self._free_slot()

    def _free_slot(self) -> None:
        """A slot became free: hand it to the first waiter, else shrink."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.size -= 1

    def _sweep(self) -> None:
        """Every ``IDLE_LIFETIME``: close connections idle all that time, beyond ``min_size``.

        ``low`` is the fewest idle connections seen since the last sweep;
        idle ones are a stack, so the ``low`` at its bottom were not lent
        once in the whole period.  Dead idle ones go too.
        """
        if self.closed:
            return
        idle = self.idle
        surplus = max(min(self.low, len(idle), self.size - self.db.min_size), 0)
        gone, keep = idle[:surplus], list[Connection]()
        for conn in idle[surplus:]:
            (gone if conn.is_closed() else keep).append(conn)
        if gone:
            idle[:] = keep
            for conn in gone:
                self._retire_soon(conn)
        self.low = len(idle)
        self.timer = self.loop.call_later(IDLE_LIFETIME, self._sweep)

    # -- the end ------------------------------------------------------------------

    def _shut(self) -> None:
        """Refuse new borrows, fail the waiters."""
        self.closed = True
        waiters, self.waiters = self.waiters, deque()
        # Each may fail on a pool whose loop is closed already (``terminate``).
        with contextlib.suppress(Exception):
            self.timer.cancel()
        for waiter in waiters:
            if not waiter.done():
                with contextlib.suppress(Exception):
                    waiter.set_exception(asyncpg.InterfaceError("the connection pool was closed"))

    async def close(self, timeout: float) -> None:
        """Close the idle connections gracefully and wait up to ``timeout`` for the lent ones.

        A lent connection is closed when it comes back (``put`` sees
        ``closed``); whatever is still open after ``timeout`` is terminated.
        """
        self._shut()
        for task in list(self.opening):
            task.cancel()
        idle, self.idle = self.idle, []
        for conn in idle:
            self._retire_soon(conn)
        try:
            async with asyncio.timeout(timeout):
                while self.size > 0:
                    busy = self.opening | self.closing
                    if busy:
                        await asyncio.gather(*busy, return_exceptions=True)
                    else:
                        await asyncio.sleep(0.01)  # a lent connection is still out
        except TimeoutError:
            pass
        finally:
            self.terminate()

    def terminate(self) -> None:
        """Drop every connection at once (a pool whose loop is gone; after ``close``)."""
        if not self.closed:
            self._shut()
        for task in [*self.opening, *self.closing]:
            with contextlib.suppress(Exception):  # its loop may be closed already
                task.cancel()
        everyone, self.everyone = self.everyone, set()
        self.idle = []
        for conn in everyone:
            with contextlib.suppress(Exception):
                conn.terminate()


class _Borrow:
    """One ``async with db.connection()`` or ``db.transaction()``.

    A class rather than ``contextlib.asynccontextmanager``: the generator and
    its context manager, plus ``failures_as``, cost more CPU per borrow than
    taking the connection does.  Driver failures raised in the block, or in
    taking the connection, leave as ``error`` with the failure as its cause,
    exactly as ``failures_as`` does.
    """

    __slots__ = ("_action", "_begin", "_conn", "_db", "_error", "_pool")

    def __init__(self, db: Database, action: str, error: type[MailbagError], begin: bool) -> None:
        self._db = db
        self._action = action
        self._error = error
        self._begin = begin

    def _failure(self, exc: BaseException) -> MailbagError:
        return self._error(f"database: cannot {self._action}: {describe(exc)}")

    async def __aenter__(self) -> Connection:
        db = self._db
        pool = db._pool
        if pool is None or pool.loop is not asyncio.get_running_loop():
            pool = db._new_pool()
        try:
            conn = pool.take()
            if conn is None:
                conn = await pool.acquire()
            if self._begin:
                try:
                    await conn.execute(BEGIN)
                except BaseException as exc:
                    if not pool.put(conn, exc):
                        await pool.retire(conn)
                    raise
        except DRIVER_FAILURES as exc:
            raise self._failure(exc) from exc
        self._pool = pool
        self._conn = conn
        return conn

    async def __aexit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        pool = self._pool
        if self._begin:
            try:
                if exc is None:
                    await conn.execute("COMMIT")
                elif not conn.is_closed() and conn.is_in_transaction():
                    # If this fails too (a query was cut mid-way), ``put`` terminates
                    # the connection, which ends the transaction on the server.
                    with contextlib.suppress(Exception):
                        await conn.execute("ROLLBACK")
            except BaseException as failure:  # COMMIT failed, or cancelled meanwhile
                if not pool.put(conn, failure):
                    await pool.retire(conn)
                if _is_driver_failure(failure):
                    raise self._failure(failure) from failure
                raise
        if not pool.put(conn, exc):
            await pool.retire(conn)
        if exc is not None and _is_driver_failure(exc):
            raise self._failure(exc) from exc


class Database:
    """A lazily created connection pool with failures mapped to one error family.

    ``dsn`` is a libpq URI or key/value string, several hosts allowed
    (``postgresql://db1,db2/mailbag?target_session_attrs=read-write``).
    At most ``max_size`` connections are open at once; ``min_size`` are
    opened when a borrow finds none (see ``_Pool._warm_up``) and kept while
    idle.  A borrower that finds all ``max_size`` lent waits its turn, for
    at most ``connect_timeout + command_timeout``.
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
        self._pool: _Pool | None = None

    def __repr__(self) -> str:
        # The DSN may carry a password: never show it.
        return f"Database(pool {self.min_size}-{self.max_size})"

    def _new_pool(self) -> _Pool:
        """A pool for the running loop (first use, after ``close``, or a new loop)."""
        self._forget_pool()
        pool = self._pool = _Pool(self, asyncio.get_running_loop())
        _open.add(self)
        return pool

    def _forget_pool(self) -> None:
        """Drop a pool whose loop is gone (its sockets die with that loop)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    def connection(self, action: str, *, error: type[MailbagError] | None = None) -> _Borrow:
        """Borrow a connection for one short piece of work: ``async with db.connection(...)``.

        Failures become ``error`` (default ``self.error``): one pool serves
        storage (``StorageError``) and users (``AuthError``) alike.
        """
        return _Borrow(self, action, error or self.error, False)

    def transaction(self, action: str, *, error: type[MailbagError] | None = None) -> _Borrow:
        """A connection inside one transaction: committed on success, rolled back otherwise.

        A cancelled task commits nothing: the block's exit tries a
        ``ROLLBACK``, and the connection is then closed (see the module
        docstring), which ends any transaction still open on the server.

        ``BEGIN`` and ``SET LOCAL synchronous_commit = on`` travel in one
        round trip (a simple query), so a durable transaction costs no more
        than asyncpg's own ``conn.transaction()``.
        """
        return _Borrow(self, action, error or self.error, True)

    async def close(self) -> None:
        """Close the pool gracefully (at shutdown); the next use opens a new one."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if pool.loop is asyncio.get_running_loop():
            await pool.close(self.connect_timeout)
        else:
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

"""The connection pool of ``database.pool``: its limit, its queue, cancellation, bad connections.

Against the real PostgreSQL (``tests/pgtest.py``).  Each test names its
connections with an ``application_name`` of its own, so ``pg_stat_activity``
shows what the pool really holds on the server.  The tests that exercise the
waiting and cancellation paths run on the standard loop and on uvloop (the
loop of the server).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

from mailbag.database import pool as pool_module
from mailbag.database.pool import Database, close_all
from mailbag.errors import AuthError, MaildropLocked, StorageError
from tests.pgtest import ADMIN_DSN, fresh_database

T = TypeVar("T")

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with fresh_database(initialise=False) as dsn:
        yield dsn


def run(go: Callable[[], Awaitable[T]], loop: str = "asyncio") -> T:
    """Run ``go()`` on a fresh loop of the kind named, closing its pools at the end."""

    async def main() -> T:
        try:
            return await go()
        finally:
            await close_all()

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())  # type: ignore[no-any-return]
    return asyncio.run(main())


def app_name() -> str:
    return f"mailbag-pool-test-{uuid.uuid4().hex[:8]}"


async def server_pids(app: str) -> set[int]:
    """The backends the server has for connections named ``app``."""
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", app)
    finally:
        await conn.close()
    return {int(row["pid"]) for row in rows}


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def pid(db: Database) -> int:
    async with db.connection("read the backend pid") as conn:
        return int(await conn.fetchval("SELECT pg_backend_pid()"))


def the_pool(db: Database) -> Any:
    assert db._pool is not None
    return db._pool


@pytest.mark.parametrize("loop", LOOPS)
def test_50_borrowers_never_get_more_than_max_size(dsn: str, loop: str) -> None:
    app = app_name()

    async def go() -> None:
        db = Database(dsn, min_size=2, max_size=4, application_name=app)
        lent = peak = 0
        pids: set[int] = set()
        seen_on_server = 0
        stop = asyncio.Event()

        async def borrower() -> None:
            nonlocal lent, peak
            for _ in range(5):
                async with db.connection("test") as conn:
                    lent += 1
                    peak = max(peak, lent)
                    pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
                    await asyncio.sleep(0.002)  # hold it across loop turns
                    lent -= 1

        async def watch() -> None:
            nonlocal seen_on_server
            while not stop.is_set():
                seen_on_server = max(seen_on_server, len(await server_pids(app)))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(borrower() for _ in range(50)))
        stop.set()
        await watcher
        assert peak == 4  # every slot in use, never one more
        assert len(pids) == 4  # nothing was replaced
        assert 0 < seen_on_server <= 4
        pool = the_pool(db)
        assert pool.size == 4 and len(pool.idle) == 4 and not pool.waiters
        assert await server_pids(app) == pids

    run(go, loop)


def test_waiters_are_served_first_come_first_served(dsn: str) -> None:
    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1)
        order: list[int] = []

        async def borrower(n: int) -> None:
            async with db.connection("test"):
                order.append(n)

        async with db.connection("hold"):
            tasks = []
            for n in range(5):
                tasks.append(asyncio.create_task(borrower(n)))
                await asyncio.sleep(0)  # queued in this order
            await asyncio.sleep(0.01)
            assert len(the_pool(db).waiters) == 5
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]

    run(go)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_cancelled_waiter_leaks_nothing(dsn: str, loop: str) -> None:
    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1)
        async with db.connection("hold") as held:
            first = await held.fetchval("SELECT pg_backend_pid()")
            waiter = asyncio.create_task(pid(db))
            await asyncio.sleep(0.01)
            pool = the_pool(db)
            assert len(pool.waiters) == 1
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert not pool.waiters
        assert pool.idle == [held] and pool.size == 1
        assert await pid(db) == first

    run(go, loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_waiter_cancelled_after_it_was_handed_the_connection_gives_it_back(
    dsn: str, loop: str
) -> None:
    """The connection is handed over at the holder's exit; the waiter, cancelled before
    it ran again, puts it back instead of losing it."""

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1)
        borrow = db.connection("hold")
        held = await borrow.__aenter__()
        first = await held.fetchval("SELECT pg_backend_pid()")
        waiter = asyncio.create_task(pid(db))
        await asyncio.sleep(0.01)
        pool = the_pool(db)
        await borrow.__aexit__(None, None, None)  # hands it to the waiter; no await inside
        assert not pool.idle and not pool.waiters
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.idle == [held] and pool.size == 1
        assert await pid(db) == first

    run(go, loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_waiter_cancelled_after_it_was_handed_a_slot_frees_it(dsn: str, loop: str) -> None:
    """A connection that died while lent frees its slot for the first waiter, which
    is cancelled before it opens a connection in it: the slot is free again."""

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1)
        borrow = db.connection("hold")
        held = await borrow.__aenter__()
        waiter = asyncio.create_task(pid(db))
        await asyncio.sleep(0.01)
        pool = the_pool(db)
        held.terminate()
        await borrow.__aexit__(None, None, None)  # closed: its slot goes to the waiter
        assert pool.size == 1 and not pool.waiters
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.size == 0 and not pool.idle
        await pid(db)
        assert pool.size == 1

    run(go, loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_borrower_cancelled_while_connecting_frees_its_slot(dsn: str, loop: str) -> None:
    app = app_name()

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1, application_name=app)
        borrower = asyncio.create_task(pid(db))
        await asyncio.sleep(0)  # it ran up to its first wait, inside asyncpg.connect
        pool = the_pool(db)
        assert pool.size == 1 and not pool.everyone
        borrower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await borrower
        assert pool.size == 0
        assert await pid(db) in await server_pids(app)
        assert pool.size == 1

        async def one_left() -> bool:
            return len(await server_pids(app)) == 1

        await eventually(one_left)

    run(go, loop)


def test_waiting_is_bounded_and_fails_as_the_callers_error(dsn: str) -> None:
    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1, connect_timeout=0.2, command_timeout=0.2)
        async with db.connection("hold"):
            started = time.monotonic()
            with pytest.raises(AuthError) as caught:
                async with db.connection("wait", error=AuthError):
                    pass
            assert 0.35 < time.monotonic() - started < 3
            assert isinstance(caught.value.__cause__, TimeoutError)
            assert "no connection free within 0.4 s" in str(caught.value)
            assert not the_pool(db).waiters
        assert the_pool(db).size == 1
        await pid(db)

    run(go)


def test_a_connection_killed_on_the_server_is_replaced_on_the_next_borrow(dsn: str) -> None:
    app = app_name()

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=2, application_name=app)
        first = await pid(db)
        pool = the_pool(db)
        (idle,) = pool.idle
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        finally:
            await admin.close()

        async def noticed() -> bool:
            return bool(idle.is_closed())

        await eventually(noticed)
        second = await pid(db)  # no error: the dead one is not lent
        assert second != first
        assert pool.size == 1 and pool.idle != [idle]
        assert await server_pids(app) == {second}

    run(go)


def test_a_session_ended_by_the_server_while_lent_is_not_lent_again(dsn: str) -> None:
    """The borrow fails as StorageError (the server's FATAL), the next one reconnects."""

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1)
        first = await pid(db)
        with pytest.raises(StorageError):
            async with db.connection("end my own session") as conn:
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        assert await pid(db) != first

    run(go)


@pytest.mark.parametrize("loop", LOOPS)
def test_cancelled_inside_a_borrow_the_connection_is_closed_and_its_query_cancelled(
    dsn: str, loop: str
) -> None:
    app = app_name()

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1, application_name=app)
        first = await pid(db)

        async def sleeper() -> None:
            async with db.connection("sleep") as conn:
                await conn.execute("SELECT pg_sleep(30)")

        task = asyncio.create_task(sleeper())

        async def sleeping() -> bool:
            admin = await asyncpg.connect(ADMIN_DSN)
            try:
                query = await admin.fetchval(
                    "SELECT query FROM pg_stat_activity WHERE pid = $1", first)
            finally:
                await admin.close()
            return "pg_sleep" in (query or "")

        await eventually(sleeping)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        second = await pid(db)  # a new connection in the slot the old one left
        assert second != first

        async def old_one_gone() -> bool:
            return first not in await server_pids(app)

        await eventually(old_one_gone, within=3.0)  # cancelled, not left sleeping 30 s

    run(go, loop)


def test_a_timeout_inside_a_borrow_closes_the_connection(dsn: str) -> None:
    """The borrow's error comes once the connection is closed (its query cancelled)."""
    app = app_name()

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1, command_timeout=0.2, application_name=app)
        first = await pid(db)
        with pytest.raises(StorageError) as caught:
            async with db.connection("sleep") as conn:
                await conn.execute("SELECT pg_sleep(10)")  # command_timeout ends it
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert the_pool(db).size == 0 and conn.is_closed()
        second = await pid(db)
        assert second != first
        with pytest.raises(StorageError):
            async with db.connection("sleep") as conn:
                await asyncio.wait_for(conn.execute("SELECT pg_sleep(10)"), 0.1)
        assert the_pool(db).size == 0 and conn.is_closed()

        async def none_left() -> bool:
            return not await server_pids(app)

        await eventually(none_left, within=3.0)  # not sleeping on for 10 s

    run(go)


def test_a_server_error_outside_a_transaction_keeps_the_connection(dsn: str) -> None:
    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1)
        first = await pid(db)
        with pytest.raises(StorageError) as caught:
            async with db.connection("divide") as conn:
                await conn.fetchval("SELECT 1 / 0")
        assert isinstance(caught.value.__cause__, asyncpg.DivisionByZeroError)
        assert "cannot divide: DivisionByZeroError" in str(caught.value)
        assert await pid(db) == first
        # Our own errors raised between queries keep it too.
        with pytest.raises(MaildropLocked):
            async with db.connection("lock"):
                raise MaildropLocked("in use")
        assert await pid(db) == first

    run(go)


def test_a_transaction_rolls_back_on_a_server_error_and_keeps_the_connection(dsn: str) -> None:
    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1)
        async with db.connection("create") as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS pool_t (n int)")
            await conn.execute("TRUNCATE pool_t")
            first = await conn.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(StorageError):
            async with db.transaction("insert then fail") as conn:
                assert await conn.fetchval("SHOW synchronous_commit") == "on"
                await conn.execute("INSERT INTO pool_t VALUES (1)")
                await conn.execute("SELECT 1 / 0")
        async with db.transaction("insert") as conn:
            await conn.execute("INSERT INTO pool_t VALUES (2)")
        async with db.connection("read") as conn:
            assert await conn.fetchval("SELECT array_agg(n) FROM pool_t") == [2]
            assert await conn.fetchval("SELECT pg_backend_pid()") == first
            assert not conn.is_in_transaction()

    run(go)


def test_a_connection_left_in_a_transaction_is_not_lent_again(dsn: str) -> None:
    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1)
        async with db.connection("create") as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS pool_u (n int)")
            first = await conn.fetchval("SELECT pg_backend_pid()")
        async with db.connection("forget to commit") as conn:
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO pool_u VALUES (1)")
        async with db.connection("read") as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") != first
            assert await conn.fetchval("SELECT count(*) FROM pool_u") == 0

    run(go)


def test_every_connection_has_the_session_settings(dsn: str) -> None:
    app = app_name()

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=1, application_name=app)
        async with db.connection("settings") as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
            assert await conn.fetchval("SHOW application_name") == app

    run(go)


def test_the_first_borrow_warms_up_to_min_size_and_idle_ones_beyond_it_are_closed(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "IDLE_LIFETIME", 0.3)
    app = app_name()

    async def go() -> None:
        db = Database(dsn, min_size=3, max_size=6, application_name=app)
        await pid(db)
        pool = the_pool(db)

        async def warm() -> bool:
            return len(pool.idle) == 3 and len(await server_pids(app)) == 3

        await eventually(warm)

        async def hold() -> None:
            async with db.connection("burst") as conn:
                await conn.execute("SELECT pg_sleep(0.05)")

        await asyncio.gather(*(hold() for _ in range(6)))
        assert pool.size == 6

        async def trimmed() -> bool:
            return pool.size == 3 and len(await server_pids(app)) == 3

        await eventually(trimmed)  # two sweeps: idle a whole period, then closed
        await pid(db)

    run(go)


def test_a_pool_belongs_to_its_loop(dsn: str) -> None:
    """A new loop gets a new pool; the old one's connections are terminated."""
    app = app_name()
    db = Database(dsn, min_size=0, max_size=2, application_name=app)
    first = asyncio.run(pid(db))  # no close: the loop ends with the connection open
    old = the_pool(db)
    second = asyncio.run(pid(db))
    assert the_pool(db) is not old and old.closed and not old.everyone
    assert second != first

    async def only_the_new_one() -> bool:
        return await server_pids(app) == {second}

    run(lambda: eventually(only_the_new_one))
    uvloop = pytest.importorskip("uvloop")

    async def on_uvloop() -> int:
        try:
            return await pid(db)
        finally:
            await db.close()  # (uvloop would close the socket itself, with a warning)

    third = uvloop.run(on_uvloop())
    assert third != second

    async def none_left() -> bool:
        return not await server_pids(app)

    run(lambda: eventually(none_left))


def test_close_waits_for_the_lent_connections_and_fails_the_waiters(dsn: str) -> None:
    app = app_name()

    async def go() -> None:
        db = Database(dsn, min_size=0, max_size=2, application_name=app)
        borrows = [db.connection("hold"), db.connection("hold")]
        for borrow in borrows:
            await borrow.__aenter__()
        pool = the_pool(db)
        waiter = asyncio.create_task(pid(db))
        await asyncio.sleep(0.01)
        assert len(pool.waiters) == 1
        closing = asyncio.create_task(db.close())
        with pytest.raises(StorageError, match="closed"):
            await waiter
        await asyncio.sleep(0.05)
        assert not closing.done()  # waiting for the lent ones
        assert db._pool is None
        for borrow in borrows:
            await borrow.__aexit__(None, None, None)
        await closing
        assert pool.size == 0 and not pool.everyone
        assert await server_pids(app) == set()
        await pid(db)  # the next use opens a new pool
        assert the_pool(db) is not pool

    run(go)

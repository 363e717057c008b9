"""The login defence on PostgreSQL: every node sees every failure and known network.

Two "nodes" are two sets of objects on two pools over one fresh database,
exactly what two mailbag processes would have.  The policy on top
(``session.throttle``) is the same as on the embedded default, so these tests
are about the state only: sharing, expiry by database time, and failing safe.
"""

from __future__ import annotations

import asyncio

from mailbag.database.pool import Database
from mailbag.database.schema import LATEST, upgrade, version
from mailbag.session.pg_defence import (
    READ_FRESH,
    PostgresFailureCounters,
    PostgresKnownNetworks,
)
from mailbag.session.throttle import DefenceState, FailureThrottle
from tests.pgtest import fresh_database, require_postgres

KEYS = ("addr:192.0.2.1", "acct:alice", "pair:alice|192.0.2.0/24")


def _node(dsn: str) -> tuple[Database, PostgresFailureCounters, PostgresKnownNetworks]:
    db = Database(dsn, min_size=0, max_size=2)
    return db, PostgresFailureCounters(db), PostgresKnownNetworks(db)


def test_two_nodes_share_failures_and_known_networks() -> None:
    require_postgres()
    with fresh_database() as dsn:

        async def go() -> None:
            db1, counters1, known1 = _node(dsn)
            db2, counters2, known2 = _node(dsn)
            try:
                assert await counters1.add(KEYS[:2], 60.0) == [1, 1]
                assert await counters2.add(KEYS[:2], 60.0) == [2, 2]  # counted on node 1 too
                assert await counters1.counts(KEYS, 60.0) == [2, 2, 0]
                await counters2.reset(KEYS[0])
                assert await counters1.counts(KEYS, 60.0) == [0, 2, 0]
                assert not await known2.is_known("alice", "192.0.2.0/24", 3600.0)
                await known1.remember("alice", "192.0.2.0/24", 3600.0)
                assert await known2.is_known("alice", "192.0.2.0/24", 3600.0)
                assert not await known2.is_known("bob", "192.0.2.0/24", 3600.0)
            finally:
                await db1.close()
                await db2.close()

        asyncio.run(go())


def test_failures_and_networks_expire_by_database_time() -> None:
    require_postgres()
    with fresh_database() as dsn:

        async def go() -> None:
            db, counters, known = _node(dsn)
            try:
                await counters.add(KEYS[:1], 60.0)
                await known.remember("alice", "192.0.2.0/24", 3600.0)
                async with db.connection("age the rows") as conn:
                    await conn.execute(
                        "UPDATE auth_failures SET last_at = now() - interval '2 min'"
                    )
                    await conn.execute(
                        "UPDATE known_networks SET last_seen = now() - interval '2 hours'"
                    )
                assert await counters.counts(KEYS[:1], 60.0) == [0]  # outside the window
                assert await counters.add(KEYS[:1], 60.0) == [1]  # starts again from one
                other_db, _, other_known = _node(dsn)  # a node that has no memory of it
                assert not await other_known.is_known("alice", "192.0.2.0/24", 3600.0)
                await other_db.close()
            finally:
                await db.close()

        asyncio.run(go())


def test_a_throttle_on_another_node_delays_a_guess_counted_elsewhere() -> None:
    """Guesses spread over two nodes count as on one (issue: shared defences)."""
    require_postgres()
    with fresh_database() as dsn:

        async def go() -> None:
            db1, counters1, known1 = _node(dsn)
            db2, counters2, known2 = _node(dsn)
            one = FailureThrottle(base=1.0, cap=8.0, window=600.0,
                                  state=DefenceState(counters1, known1))
            two = FailureThrottle(base=1.0, cap=8.0, window=600.0,
                                  state=DefenceState(counters2, known2))
            try:
                for node in (one, two, one, two):
                    admission = await node.admit("192.0.2.7", "alice")
                    await node.record_failure(admission)
                db3, counters3, known3 = _node(dsn)
                fresh = FailureThrottle(base=1.0, cap=8.0, window=600.0,
                                        state=DefenceState(counters3, known3))
                later = await fresh.admit("198.51.100.9", "alice")  # a third node, new address
                assert later.delay > 0  # the account's four failures are known everywhere
                await db3.close()
            finally:
                await db1.close()
                await db2.close()

        asyncio.run(go())


def test_database_errors_fail_safe_and_never_raise() -> None:
    async def go() -> None:
        db = Database("postgresql://nobody@127.0.0.1:1/none", min_size=0, max_size=1,
                      connect_timeout=0.5)
        counters, known = PostgresFailureCounters(db), PostgresKnownNetworks(db)
        assert await counters.counts(KEYS, 60.0) == [0, 0, 0]
        assert await counters.add(KEYS[:1], 60.0) == [1]
        await counters.reset(KEYS[0])
        assert await counters.counts(KEYS, 60.0) == [0, 0, 0]
        assert not await known.is_known("alice", "192.0.2.0/24", 60.0)
        await known.remember("alice", "192.0.2.0/24", 60.0)
        await db.close()

    asyncio.run(go())


def test_an_outage_counts_failures_on_the_node_and_keeps_them_after_recovery() -> None:
    """A database outage must not switch the throttle off (users may be in a file).

    Failures during the outage are counted in the node's memory, so a guesser
    is still delayed; once the database answers, those counts are merged with
    the shared ones until they expire, and a success clears them as usual.
    """
    async def go() -> None:
        down = Database("postgresql://nobody@127.0.0.1:1/none", min_size=0, max_size=1,
                        connect_timeout=0.5)
        counters = PostgresFailureCounters(down)
        assert await counters.add(KEYS, 60.0) == [1, 1, 1]
        assert await counters.add(KEYS[:1], 60.0) == [2]
        assert await counters.counts(KEYS, 60.0) == [2, 1, 1]
        throttle = FailureThrottle(base=1.0, cap=8.0, window=600.0,
                                   state=DefenceState(counters, PostgresKnownNetworks(down)))
        for _ in range(3):
            admission = await throttle.admit("192.0.2.7", "alice")
            await throttle.record_failure(admission)
        assert (await throttle.admit("192.0.2.7", "alice")).delay > 0
        await down.close()

    asyncio.run(go())

    require_postgres()
    with fresh_database() as dsn:
        async def recovered() -> None:
            db = Database(dsn, min_size=0, max_size=2)
            try:
                counters = PostgresFailureCounters(db)
                counters._db = Database("postgresql://nobody@127.0.0.1:1/none", min_size=0,
                                        max_size=1, connect_timeout=0.5)
                assert await counters.add(KEYS[:1], 60.0) == [1]
                assert await counters.add(KEYS[:1], 60.0) == [2]
                await counters._db.close()
                counters._db = db  # the database is back
                assert await counters.counts(KEYS, 60.0) == [2, 0, 0]
                assert await counters.add(KEYS[:1], 60.0) == [2]  # shared 1, local 2
                await counters.reset(KEYS[0])
                assert await counters.counts(KEYS, 60.0) == [0, 0, 0]
            finally:
                await db.close()

        asyncio.run(recovered())


def test_db_upgrade_adds_the_defence_tables_to_a_version_2_database() -> None:
    require_postgres()
    with fresh_database(initialise=False) as dsn:

        async def go() -> None:
            db = Database(dsn, min_size=0, max_size=1)
            try:
                assert await upgrade(db, target=2) == (0, 2)
                assert await upgrade(db) == (2, LATEST)
                assert await version(db) == LATEST >= 3
                await PostgresFailureCounters(db).add(KEYS[:1], 60.0)
            finally:
                await db.close()

        asyncio.run(go())


def test_a_polling_login_costs_no_defence_writes() -> None:
    """A known network seen moments ago is answered from memory and not rewritten; a
    reset of a key just read as zero is skipped (never in the guesser's favour)."""
    require_postgres()
    with fresh_database() as dsn:

        async def go() -> None:
            db, counters, known = _node(dsn)
            try:
                await known.remember("alice", "192.0.2.0/24", 3600.0)
                async with db.connection("read") as conn:
                    first = await conn.fetchval("SELECT last_seen FROM known_networks")
                    await conn.execute("DELETE FROM known_networks")
                assert first is not None
                # Answered from this node's memory, no row needed, nothing written again.
                assert await known.is_known("alice", "192.0.2.0/24", 3600.0)
                await known.remember("alice", "192.0.2.0/24", 3600.0)
                async with db.connection("read") as conn:
                    assert await conn.fetchval("SELECT count(*) FROM known_networks") == 0
                now = [1000.0]
                counters = PostgresFailureCounters(db, clock=lambda: now[0])
                assert await counters.counts(KEYS[:1], 60.0) == [0]
                other_db, other, _ = _node(dsn)
                await other.add(KEYS[:1], 60.0)  # another node counts a failure meanwhile
                await counters.reset(KEYS[0])  # skipped: just read as zero here
                # Read as zero moments ago: not read again (READ_FRESH) ...
                assert await counters.counts(KEYS[:1], 60.0) == [0]
                now[0] += READ_FRESH
                assert await counters.counts(KEYS[:1], 60.0) == [1]  # ... then seen, kept
                await counters.reset(KEYS[0])  # not zero any more: deleted
                assert await counters.counts(KEYS[:1], 60.0) == [0]
                # This node's own failure forgets the memo at once.
                await counters.add(KEYS[:1], 60.0)
                assert await counters.counts(KEYS[:1], 60.0) == [1]
                await other_db.close()
            finally:
                await db.close()

        asyncio.run(go())

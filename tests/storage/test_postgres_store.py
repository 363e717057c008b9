"""PostgreSQL backend beyond the shared contract: leases across nodes, quotas, transactions.

Each "node" is a ``PostgresStore`` with its own node id and pool on the same
database, which is exactly what two mailbag processes on two machines are.
Lease times are short (1-2 s) so that expiry can be observed quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from mailbag.errors import InvalidUsername, MaildropLocked, QuotaExceeded, StorageError
from mailbag.storage.base import (
    Delivery,
    ImportMessage,
    MultiDelivery,
    SelfCheck,
    Usage,
    deliver_many,
)
from mailbag.storage.maildir_names import derive_uidl
from mailbag.storage.postgres import PostgresStore
from mailbag.storage.postgres.leases import LeaseLost, listing_order
from tests.pgtest import fresh_database
from tests.storage.helpers import read_all, run

#: Leases held now (a released row stays, with expires_at '-infinity').
HELD = "SELECT count(*) AS n FROM leases WHERE expires_at > now()"


@pytest.fixture
def dsn() -> Iterator[str]:
    with fresh_database() as dsn:
        yield dsn


def node(dsn: str, name: str, **options: Any) -> PostgresStore:
    options.setdefault("pool_min_size", 1)
    options.setdefault("pool_max_size", 3)
    return PostgresStore(dsn, node_id=name, **options)


@contextlib.contextmanager
def lease_rounds(store: PostgresStore, on_round: Any = None) -> Iterator[list[str]]:
    """Watch the node's lease statements: a list that grows by one per round sent."""
    rounds: list[str] = []
    real = store.leases.db.connection

    def watching(action: str, **kw: Any) -> Any:
        if action == "lease maildrops":
            rounds.append(action)
            if on_round is not None:
                on_round()
        return real(action, **kw)

    store.leases.db.connection = watching  # type: ignore[method-assign]
    try:
        yield rounds
    finally:
        store.leases.db.connection = real  # type: ignore[method-assign]


async def fetch(store: PostgresStore, sql: str, *args: Any) -> Any:
    async with store.db.connection("test query") as conn:
        return await conn.fetch(sql, *args)


def test_open_from_another_node_gets_maildrop_locked(dsn: str) -> None:
    async def go() -> None:
        a, b = node(dsn, "a"), node(dsn, "b")
        md = await a.open_maildrop("alice")
        with pytest.raises(MaildropLocked):
            await b.open_maildrop("alice")
        with pytest.raises(MaildropLocked):  # the same node, a second session
            await a.open_maildrop("alice")
        other = await b.open_maildrop("bob")
        await other.close()
        await md.close()
        again = await b.open_maildrop("alice")
        await again.close()

    run(go())


def test_heartbeat_keeps_a_live_session_locked_past_the_bound(dsn: str) -> None:
    async def go() -> None:
        a, b = node(dsn, "a", lease_time=1.2), node(dsn, "b", lease_time=1.2)
        await a.deliver("alice", b"one\n")
        md = await a.open_maildrop("alice")
        await asyncio.sleep(2.5)  # twice the bound; the heartbeat renewed it
        with pytest.raises(MaildropLocked):
            await b.open_maildrop("alice")
        result = await md.delete([md.messages[0].uid])
        assert result.deleted == 1
        await md.close()

    run(go())


def test_dead_node_loses_its_lease_after_the_bound_and_can_never_commit(dsn: str) -> None:
    """Issue 13: a node cut off frees its locks within the bound and cannot commit after it."""

    async def go() -> None:
        a, b = node(dsn, "a", lease_time=1.0), node(dsn, "b", lease_time=1.0)
        uids = [await a.deliver("alice", b"m%d\n" % i) for i in range(3)]
        md = await a.open_maildrop("alice")
        await a.leases.stop()  # the node hangs: no more heartbeats
        with pytest.raises(MaildropLocked):
            await b.open_maildrop("alice")
        await asyncio.sleep(1.3)
        with pytest.raises(LeaseLost):  # expired, even before anyone took it over
            await md.delete(uids[:1])
        taken = await b.open_maildrop("alice")  # a fresh node can open now
        assert [m.uid for m in taken.messages] == uids
        with pytest.raises(LeaseLost):  # and the late node's QUIT is still refused
            await md.delete(uids)
        await md.close()  # must not release b's lease
        with pytest.raises(MaildropLocked):
            await a.open_maildrop("alice")
        assert (await taken.delete(uids[2:])).deleted == 1
        await taken.close()
        check = await b.open_maildrop("alice")
        assert [m.uid for m in check.messages] == uids[:2]
        await check.close()

    run(go())


def test_lease_lost_is_a_storage_error() -> None:
    assert issubclass(LeaseLost, StorageError)


def test_cancelled_quit_commits_nothing(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        a = node(dsn, "a")
        uids = [await a.deliver("alice", b"keep me\n") for _ in range(2)]
        md = await a.open_maildrop("alice")
        original = a.leases.check
        reached = asyncio.Event()

        async def slow_check(*args: Any) -> None:
            await original(*args)
            reached.set()
            await asyncio.sleep(30)

        monkeypatch.setattr(a.leases, "check", slow_check)
        task = asyncio.create_task(md.delete(uids))
        await reached.wait()
        task.cancel()  # the client dropped the connection mid-QUIT
        with pytest.raises(asyncio.CancelledError):
            await task
        await md.close()
        monkeypatch.undo()
        again = await a.open_maildrop("alice")
        assert [m.uid for m in again.messages] == uids
        await again.close()
        assert (await a.usage("alice")).messages == 2

    run(go())


def test_forgotten_maildrop_releases_its_lease(dsn: str) -> None:
    async def go() -> None:
        a = node(dsn, "a")
        md = await a.open_maildrop("alice")
        del md
        gc.collect()
        for _ in range(50):
            await asyncio.sleep(0.05)
            try:
                again = await a.open_maildrop("alice")
            except MaildropLocked:
                continue
            await again.close()
            return
        pytest.fail("lease of a garbage-collected maildrop was never released")

    run(go())


def test_uidl_derives_from_a_maildir_unique_name(dsn: str) -> None:
    async def go() -> None:
        a = node(dsn, "a", hostname="mx1")
        uid = await a.deliver("alice", b"Subject: x\n\nbody\n")
        (row,) = await fetch(a, "SELECT unique_name, uid, stored_size, wire_size FROM messages")
        assert row["uid"] == uid == derive_uidl(row["unique_name"])
        assert row["unique_name"].endswith(".mx1,S=17,W=20")
        assert (row["stored_size"], row["wire_size"]) == (17, 20)

    run(go())


def test_stat_never_reads_bodies_and_top_reads_only_the_first_row(dsn: str) -> None:
    async def go() -> None:
        a = node(dsn, "a", chunk_size=1024)
        message = b"Subject: big\n\n" + b"line\n" * 1000
        uid = await a.deliver("alice", message)
        (count,) = await fetch(a, "SELECT count(*) AS n FROM message_chunks")
        assert count["n"] == 5
        await fetch(a, "DELETE FROM message_chunks WHERE n >= 1")
        md = await a.open_maildrop("alice")
        try:
            assert md.messages[0].size == len(message) + message.count(b"\n")  # LF -> CRLF
            chunks = md.read(uid, chunk_size=4096)
            first = await anext(chunks)  # TOP: header and first lines
            assert first == message[:1024]
            await chunks.aclose()
            with pytest.raises(StorageError):  # RETR would need the rows we removed
                await read_all(md, uid)
        finally:
            await md.close()

    run(go())


def test_reading_in_order_reads_small_messages_ahead_in_one_query(dsn: str) -> None:
    """RETR 1, RETR 2, ...: one query brings the next small messages, within a bound.

    The rows of messages 2-4 are removed after message 1 was read: they are
    still served, so they came with message 1.  A message past the octet
    bound was not read ahead, and a read out of order reads only itself.
    """
    from mailbag.storage.postgres import maildrop as pg_maildrop

    async def go() -> None:
        a = node(dsn, "a")
        bodies = [b"Subject: %d\n\n" % i + b"x" * 100 + b"\n" for i in range(6)]
        uids = [await a.deliver("alice", body) for body in bodies]
        md = await a.open_maildrop("alice")
        try:
            limit = sum(m.size for m in md.messages[:4])
            pg_maildrop.READ_AHEAD_OCTETS, old = limit, pg_maildrop.READ_AHEAD_OCTETS
            try:
                assert await md.read_whole(uids[0], 1 << 20) == bodies[0]
            finally:
                pg_maildrop.READ_AHEAD_OCTETS = old
            await fetch(a, "DELETE FROM message_chunks WHERE seq > (SELECT min(seq) FROM"
                           " message_chunks)")
            assert await read_all(md, uids[1]) == bodies[1]  # the stream path
            assert await md.read_whole(uids[2], 1 << 20) == bodies[2]
            assert await md.read_whole(uids[3], 1 << 20) == bodies[3]
            with pytest.raises(StorageError):  # past the bound: never read ahead
                await md.read_whole(uids[4], 1 << 20)
        finally:
            await md.close()
        # Out of order: only the message asked for is read; in order again: ahead.
        bob = [await a.deliver("bob", body) for body in bodies[:3]]
        md = await a.open_maildrop("bob")
        try:
            assert await md.read_whole(bob[2], 1 << 20) == bodies[2]
            assert await md.read_whole(bob[0], 1 << 20) == bodies[0]
            assert md._ahead == {}
            assert await md.read_whole(bob[1], 1 << 20) == bodies[1]
            assert list(md._ahead) == [bob[2]]
        finally:
            await md.close()

    run(go())


def test_quota_holds_across_nodes_under_concurrent_delivery(dsn: str) -> None:
    """Two nodes delivering at once cannot overshoot a quota (issue 13)."""

    async def go() -> None:
        nodes = [node(dsn, "a"), node(dsn, "b")]
        limit = Delivery("alice", b"x" * 98 + b"\n", max_octets=5 * 100, max_messages=0)

        async def one(i: int) -> str | StorageError:
            (result,) = await nodes[i % 2].deliver_many([limit])
            return result

        results = await asyncio.gather(*(one(i) for i in range(20)))
        accepted = [r for r in results if isinstance(r, str)]
        assert len(accepted) == 5
        assert all(isinstance(r, QuotaExceeded) for r in results if not isinstance(r, str))
        usage = await nodes[0].usage("alice")
        assert (usage.messages, usage.octets) == (5, 500)

    run(go())


def test_deliver_many_is_one_transaction(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        a = node(dsn, "a")
        assert isinstance(a, MultiDelivery)
        original = a._insert
        calls = 0

        async def fail_second(*args: Any) -> str | StorageError:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise StorageError("disk on fire")
            return await original(*args)

        monkeypatch.setattr(a, "_insert", fail_second)
        with pytest.raises(StorageError):
            await a.deliver_many([Delivery("alice", b"1\n"), Delivery("bob", b"2\n")])
        assert (await a.usage("alice")).messages == 0
        monkeypatch.undo()
        results = await deliver_many(
            a,
            [
                Delivery("alice", b"1\n"),
                Delivery("bob", b"2\n", max_messages=1),
                Delivery("bob", b"3\n", max_messages=1),
            ],
        )
        assert isinstance(results[0], str) and isinstance(results[1], str)
        assert isinstance(results[2], QuotaExceeded)
        assert (await a.usage("bob")).messages == 1

    run(go())


def test_invalid_user_in_deliver_many_writes_nothing(dsn: str) -> None:
    async def go() -> None:
        a = node(dsn, "a")
        with pytest.raises(InvalidUsername):
            await a.deliver_many([Delivery("alice", b"1\n"), Delivery("../x", b"2\n")])
        assert (await a.usage("alice")).messages == 0

    run(go())


def test_idle_sessions_hold_no_connections(dsn: str) -> None:
    """60 open sessions on a pool of at most 3 connections (no connection per session)."""

    async def go() -> None:
        a = node(dsn, "a", pool_max_size=3)
        drops = await asyncio.gather(*(a.open_maildrop(f"user{i}") for i in range(60)))
        rows = await fetch(
            a,
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'mailbag'",
        )
        assert rows[0]["n"] <= 3
        (leases,) = await fetch(a, HELD)
        assert leases["n"] == 60
        assert await a.leases.renew() == 60  # one UPDATE renews them all
        await asyncio.gather(*(md.close() for md in drops))
        await a.leases.flush()
        (leases,) = await fetch(a, HELD)
        assert leases["n"] == 0

    run(go())


def test_self_check_reports_a_failing_heartbeat(dsn: str) -> None:
    """``/healthz`` (SelfCheck.problems) turns unhealthy once leases go unrenewed a lease time."""

    async def go() -> None:
        a = node(dsn, "a", lease_time=1.0)
        assert isinstance(a, SelfCheck)
        assert a.check() == "storage: postgres (lease time 1 s)"
        assert a.problems() == []  # no lease held: nothing to renew
        md = await a.open_maildrop("alice")
        assert a.problems() == []  # just acquired
        await a.leases.stop()  # the node can no longer reach the database, as far as leases go
        await asyncio.sleep(1.2)
        assert a.problems() == ["database unreachable: maildrop lease heartbeat failing"]
        await md.close()
        assert a.problems() == []

    run(go())


def test_import_of_a_stopped_run_commits_whole_batches(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration killed part-way leaves whole batches, which the next run finds present."""
    from mailbag.storage.postgres import importer

    monkeypatch.setattr(importer, "BATCH_MESSAGES", 3)

    async def source(n: int, fail_at: int | None = None) -> AsyncIterator[ImportMessage]:
        for i in range(n):
            if i == fail_at:
                raise OSError("source went away")

            async def read(i: int = i) -> bytes:
                return b"Subject: %d\n\nbody\n" % i

            yield ImportMessage(key=f"k{i}", uid=f"uid-{i}", read=read)

    async def go() -> None:
        a = node(dsn, "a")
        with pytest.raises(OSError):
            await a.import_messages("alice", source(8, fail_at=7))
        md = await a.open_maildrop("alice")  # the lease was released
        assert [m.uid for m in md.messages] == [f"uid-{i}" for i in range(6)]
        await md.close()
        again = await a.import_messages("alice", source(8))
        assert (again.imported, again.present) == (2, 6)
        assert again.uids == [f"uid-{i}" for i in range(8)]
        assert await a.usage("alice") == Usage(8, sum(len(b"Subject: %d\r\n\r\nbody\r\n" % i)
                                                     for i in range(8)))

    run(go())


def test_listing_order_sorts_arrays_sql_did_not() -> None:
    """The arrays normally come in ``seq`` order; if not, all four are put in ``seq`` order."""
    row = {"seqs": [3, 1, 2], "uids": ["c", "a", "b"], "sizes": [30, 10, 20], "chunks": [3, 1, 2]}
    assert listing_order(row) == ([1, 2, 3], ["a", "b", "c"], [10, 20, 30], [1, 2, 3])
    ordered = {"seqs": [1, 2], "uids": ["a", "b"], "sizes": [10, 20], "chunks": [1, 1]}
    assert listing_order(ordered) == ([1, 2], ["a", "b"], [10, 20], [1, 1])
    empty = {"seqs": None, "uids": None, "sizes": None, "chunks": None}
    assert listing_order(empty) == ([], [], [], [])


def test_releases_arriving_together_share_one_statement(dsn: str) -> None:
    """Twenty sessions quitting at once: the releases reach the database in fewer
    UPDATEs than sessions, and the rows stay (released, not deleted)."""

    async def go() -> None:
        a = node(dsn, "a")
        drops = [await a.open_maildrop(f"user{i}") for i in range(20)]
        with lease_rounds(a) as rounds:
            await asyncio.gather(*(md.close() for md in drops))
            await a.leases.flush()
        statements = len(rounds)
        assert (await fetch(a, HELD))[0]["n"] == 0
        assert (await fetch(a, "SELECT count(*) AS n FROM leases"))[0]["n"] == 20
        assert 1 <= statements < 20
        again = await a.open_maildrop("user7")  # free at once, on any node
        await again.close()

    run(go())


def test_opens_arriving_together_share_one_statement(dsn: str) -> None:
    """Twenty logins at once to maildrops this node knows: their leases are taken in
    fewer statements than logins, each session holds its own, another node finds
    them locked, and two logins to one maildrop in the same batch give one
    session and one ``MaildropLocked``."""

    async def go() -> None:
        a, b = node(dsn, "a"), node(dsn, "b")
        for i in range(20):
            await a.deliver(f"user{i}", f"Subject: {i}\n\nbody\n".encode())
            md = await a.open_maildrop(f"user{i}")  # first open: the node keeps its list
            await md.close()
        await a.leases.flush()
        with lease_rounds(a) as rounds:
            opened = await asyncio.gather(
                *(a.open_maildrop(f"user{i}") for i in [*range(20), 5]), return_exceptions=True)
        statements = len(rounds)
        drops = [md for md in opened if not isinstance(md, BaseException)]
        assert [type(e) for e in opened if isinstance(e, BaseException)] == [MaildropLocked]
        assert sorted(md.messages[0].size for md in drops)[0] > 0 and len(drops) == 20
        assert 1 <= statements < 20
        assert (await fetch(a, HELD))[0]["n"] == 20
        with pytest.raises(MaildropLocked):
            await b.open_maildrop("user13")
        await asyncio.gather(*(md.close() for md in drops))
        await a.leases.flush()
        assert (await fetch(a, HELD))[0]["n"] == 0

    run(go())


def test_a_login_cancelled_while_its_lease_is_taken_leaves_nothing_held(dsn: str) -> None:
    """The client goes away while the batch holding its open is at the database: the
    lease taken for it is released, not renewed for ever by the heartbeat."""

    async def go() -> None:
        a = node(dsn, "a")
        md = await a.open_maildrop("alice")
        await md.close()
        await a.leases.flush()
        sent = asyncio.Event()
        with lease_rounds(a, on_round=sent.set):
            login = asyncio.create_task(a.open_maildrop("alice"))
            await sent.wait()  # the statement is on its way; the session is cancelled
            login.cancel()
            with pytest.raises(asyncio.CancelledError):
                await login
        for _ in range(100):  # the batch finishes on its own, then releases
            await asyncio.sleep(0.01)
            if not a.leases.holding and not a.leases._releasing:
                break
        assert not a.leases.holding
        assert (await fetch(a, HELD))[0]["n"] == 0
        again = await a.open_maildrop("alice")
        await again.close()

    run(go())


def test_a_queued_release_is_taken_over_here_and_waited_for_elsewhere(dsn: str) -> None:
    """A QUIT does not wait for its release: a new open on the same node takes the
    queued lease over (without waiting, the old token is no longer released), and
    an open on another node that finds it still locked retries until it is free."""

    async def go() -> None:
        a, b = node(dsn, "a"), node(dsn, "b")
        await a.deliver("alice", b"Subject: x\n\nbody\n")
        first = await a.open_maildrop("alice")
        await first.close()
        second = await a.open_maildrop("alice")  # same node, release still queued
        assert [m.uid for m in second.messages] == [m.uid for m in first.messages]
        await a.leases.flush()  # the old token's release must not free the new lease
        with pytest.raises(MaildropLocked):
            await b.open_maildrop("alice")
        await second.close()
        third = await b.open_maildrop("alice")  # another node, release queued on a
        assert len(third.messages) == 1
        await third.close()
        await b.leases.flush()
        rows = await fetch(a, "SELECT generation FROM leases")
        assert [r["generation"] for r in rows] == [2]  # inserted at 0, taken twice since

    run(go())


def test_a_kept_list_is_reused_only_while_the_maildrop_version_holds(dsn: str) -> None:
    """The second open of an unchanged maildrop gets no list from the database and
    reuses the node's; a delivery or a deletion on *another* node, or an import,
    moves the version, and the next open here reads the new list."""

    async def go() -> None:
        a, b = node(dsn, "a"), node(dsn, "b")
        for text in (b"one\n", b"two\n"):
            await a.deliver("alice", text)
        built: list[int] = []
        real_keep = a._keep

        def keep(user: str, maildrop_id: int, version: int, row: Any) -> Any:
            built.append(version)
            return real_keep(user, maildrop_id, version, row)

        a._keep = keep  # type: ignore[method-assign]

        async def uids(store: PostgresStore) -> list[str]:
            md = await store.open_maildrop("alice")
            try:
                return [m.uid for m in md.messages]
            finally:
                await md.close()
                await store.leases.flush()

        first = await uids(a)
        assert len(first) == 2 and built == [2]
        assert await uids(a) == first and built == [2]  # reused: nothing sent or built
        await b.deliver("alice", b"three\n")
        third = await uids(a)
        assert third[:2] == first and len(third) == 3 and built == [2, 3]
        md = await b.open_maildrop("alice")
        await md.delete([first[0]])
        await md.close()
        await b.leases.flush()
        assert await uids(a) == third[1:] and built == [2, 3, 4]
        assert await uids(a) == third[1:] and built == [2, 3, 4]

    run(go())


def test_listing_cache_keeps_within_its_budget_least_recently_used_first() -> None:
    from mailbag.storage.postgres.listings import Listing, ListingCache

    def listing(maildrop_id: int, version: int, n: int) -> Listing:
        return Listing.build(maildrop_id, version, list(range(n)), [f"u{i}" for i in range(n)],
                             [10] * n, [1] * n)

    cache = ListingCache(budget=10)
    cache.put("a", listing(1, 5, 4))
    cache.put("b", listing(2, 0, 4))
    assert cache.version("a") == 5 and cache.version("nobody") == -1
    assert cache.get("a", 1, 5) is not None  # a is now the most recently used
    assert cache.get("a", 1, 6) is None and cache.get("a", 9, 5) is None  # wrong version, id
    cache.put("c", listing(3, 0, 4))  # 12 > 10: b (least recently used) goes
    assert cache.version("b") == -1 and cache.version("a") == 5 and cache.version("c") == 0
    cache.put("big", listing(4, 0, 6))  # more than half the budget: never kept
    assert cache.version("big") == -1
    cache.put("a", listing(1, 6, 2))  # a newer list replaces the old one
    assert cache.version("a") == 6 and len(cache) == 2
    kept = cache.get("a", 1, 6)
    assert kept is not None and [m.uid for m in kept.messages] == ["u0", "u1"]
    assert kept.stored["u1"].position == 1


def test_a_round_chosen_as_a_deadlock_victim_is_sent_again() -> None:
    """PostgreSQL aborts a round to break a deadlock (SQLSTATE 40P01): its logins are
    not failed but sent again; any other database error reaches the login."""
    from mailbag.storage.postgres.leases import LeaseKeeper

    class Deadlock(Exception):
        sqlstate = "40P01"

    class Conn:
        def __init__(self, failures: list[BaseException]) -> None:
            self.failures = failures
            self.sent = 0

        async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
            self.sent += 1
            if self.failures:
                raise StorageError("database: cannot lease") from self.failures.pop(0)
            return [{"maildrop_id": args[0], "version": 7, "taken": True, "fresh": True}]

    class Db:
        def __init__(self, conn: Conn) -> None:
            self.conn = conn

        @contextlib.asynccontextmanager
        async def connection(self, action: str, **kw: Any) -> AsyncIterator[Conn]:
            yield self.conn

    async def go() -> None:
        conn = Conn([Deadlock("deadlock detected")])
        keeper = LeaseKeeper(Db(conn), node_id="n")  # type: ignore[arg-type]
        token, version, fresh = await keeper.acquire_known(5, "alice") or (0, 0, False)
        assert conn.sent == 2 and token > 0 and (version, fresh) == (7, True)
        conn.failures.append(OSError("connection reset"))
        with pytest.raises(StorageError):
            await keeper.acquire_known(6, "bob")
        await keeper.stop()

    run(go())

"""A database outage: temporary errors while it lasts, recovery without a restart (issue 13).

Uses a private PostgreSQL (the shared one must never be stopped), stopped
with ``pg_ctl -m immediate`` (no goodbye to clients, like a crash) and
started again on the same port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from mailbag.errors import MaildropLocked, StorageError
from mailbag.storage.postgres import PostgresStore
from tests.pgtest import PrivatePostgres, fresh_database
from tests.storage.helpers import read_all, run


@pytest.fixture
def server() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


def test_outage_gives_storage_errors_and_the_pool_recovers(server: PrivatePostgres) -> None:
    with fresh_database(admin=server.admin_dsn) as dsn:

        async def go() -> None:
            store = PostgresStore(
                dsn, pool_min_size=1, pool_max_size=3, connect_timeout=2, lease_time=20
            )
            first = await store.deliver("alice", b"before\n")
            md = await store.open_maildrop("alice")
            # Leases commit asynchronously (database.pool): one taken in the last
            # moments before a crash may be lost, and then its session's QUIT
            # refuses to commit (LeaseLost, tested with a dead node).  The WAL
            # writer flushes every wal_writer_delay (200 ms); after that the
            # lease survives the crash, which is what this test is about.
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.stop)
            for attempt in (
                store.deliver("alice", b"during\n"),
                store.open_maildrop("bob"),
                store.usage("alice"),
                read_all(md, first),
            ):
                with pytest.raises(StorageError) as caught:
                    await attempt
                # A temporary failure, never "in use" or "permanent": POP3 [SYS/TEMP], LMTP 451.
                assert not isinstance(caught.value, MaildropLocked)
                assert type(caught.value) is StorageError
            await asyncio.to_thread(server.start)
            # Same store, no restart: the pool replaces its dead connections.
            second = await store.deliver("alice", b"after\n")
            assert await read_all(md, first) == b"before\n"
            assert (await md.delete([first])).deleted == 1  # lease survived a short outage
            await md.close()
            again = await store.open_maildrop("alice")
            assert [m.uid for m in again.messages] == [second]
            await again.close()
            await store.close()

        run(go())

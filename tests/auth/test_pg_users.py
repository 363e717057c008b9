"""Users in PostgreSQL hold what a users-file line holds; every instance sees changes at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from mailbag.auth.pg_users import PostgresUsers
from mailbag.auth.schemes import Argon2Params, verify_password
from mailbag.auth.users import UserExists, authenticate, lookup_user
from mailbag.errors import AuthError, UnknownUser
from tests.pgtest import fresh_database

CHEAP = Argon2Params(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def dsn() -> Iterator[str]:
    with fresh_database() as dsn:
        yield dsn


def users(dsn: str, **options: object) -> PostgresUsers:
    return PostgresUsers(dsn, argon2_params=CHEAP, **options)  # type: ignore[arg-type]


def test_add_stores_hash_scram_apop_and_quota(dsn: str) -> None:
    db = users(dsn)
    db.add("Alice@Example.ORG", "pw", apop_secret="apop-secret")
    db.set_quota("Alice@example.org", bytes=1000, messages=None)
    record = db.lookup("Alice@example.org")
    assert record is not None and record.name == "Alice@Example.ORG"
    assert verify_password("pw", record.password) and not verify_password("no", record.password)
    assert record.scram is not None and record.apop_secret == "apop-secret"
    assert (record.quota_bytes, record.quota_messages) == (1000, None)
    assert authenticate(db, "Alice@example.org", "pw") == record
    assert authenticate(db, "Alice@example.org", "wrong") is None
    assert authenticate(db, "bob", "pw") is None
    with pytest.raises(UserExists):
        db.add("Alice@EXAMPLE.org", "x")


def test_change_is_seen_by_another_node_at_once(dsn: str) -> None:
    one, two = users(dsn), users(dsn)
    one.add("bob", "old", scheme="PLAIN")
    assert two.lookup("bob") is not None
    one.set_password("bob", "new", scheme="PLAIN", with_scram=False)
    record = two.lookup("bob")
    assert record is not None and record.scram is None and verify_password("new", record.password)
    one.delete("bob")
    assert two.lookup("bob") is None
    with pytest.raises(UnknownUser):
        two.delete("bob")
    with pytest.raises(UnknownUser):
        two.set_quota("bob", messages=1)


def test_default_domain_and_async_lookup_on_the_loop(dsn: str) -> None:
    db = users(dsn, default_domain="example.org")
    db.add("carol@example.org", "pw", scheme="PLAIN")

    async def go() -> None:
        for login in ("carol", "carol@EXAMPLE.org", "carol@example.org"):
            record = await lookup_user(db, login)
            assert record is not None and record.name == "carol@example.org"
        assert await lookup_user(db, "../etc") is None
        await db.close()

    asyncio.run(go())
    assert [r.name for r in db.list()] == ["carol@example.org"]


def test_unreachable_database_is_an_auth_error() -> None:
    db = PostgresUsers("postgresql://nobody@127.0.0.1:9/none")
    db.db.connect_timeout = db._sync_db.connect_timeout = 1.0
    with pytest.raises(AuthError):
        db.lookup("alice")

    async def go() -> None:
        with pytest.raises(AuthError):
            await db.lookup_async("alice")

    asyncio.run(go())


def test_a_node_caches_users_and_forgets_them_when_any_changes(dsn: str) -> None:
    """Issue 13: users are cached on a node, and a change elsewhere is seen at once.

    The node listens for the trigger's NOTIFY (schema version 4); the CLI
    (another instance, synchronous path) changes the password, deletes and
    re-adds the user, and the node's next lookup sees each change.  A cached
    answer costs no query: proved by renaming the table under it.
    """
    admin = users(dsn)
    admin.add("dave", "one", scheme="PLAIN")

    async def go() -> None:
        node = users(dsn)
        feed = node._cache.feed
        try:
            assert await node.lookup_async("dave") is not None  # starts listening
            for _ in range(100):
                if feed.live:
                    break
                await asyncio.sleep(0.02)
            assert feed.live
            first = await node.lookup_async("dave")  # stored now
            assert first is not None and verify_password("one", first.password)
            async with node.db.connection("test") as conn:
                await conn.execute("ALTER TABLE users RENAME TO users_away")
                assert await node.lookup_async("dave") == first  # from the cache
                await conn.execute("ALTER TABLE users_away RENAME TO users")

            async def seen(check: object) -> None:
                for _ in range(100):
                    record = await node.lookup_async("dave")
                    if check(record):  # type: ignore[operator]
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError("the node did not see the change within 2 s")

            await asyncio.to_thread(admin.set_password, "dave", "two", scheme="PLAIN")
            await seen(lambda r: r is not None and verify_password("two", r.password))
            await asyncio.to_thread(admin.delete, "dave")
            await seen(lambda r: r is None)
            await asyncio.to_thread(admin.add, "dave", "three", scheme="PLAIN")
            await seen(lambda r: r is not None and verify_password("three", r.password))
            # Not listening: nothing is answered from memory.
            await feed.close()
            assert not feed.live
            async with node.db.connection("test") as conn:
                await conn.execute("ALTER TABLE users RENAME TO users_away")
                with pytest.raises(AuthError):
                    await node.lookup_async("dave")
                await conn.execute("ALTER TABLE users_away RENAME TO users")
        finally:
            await node.close()

    asyncio.run(go())

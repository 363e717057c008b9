"""MemoryStore extras that session tests rely on: seeding and injected failures."""

from __future__ import annotations

import pytest

from mailbag.errors import MaildropLocked, StorageError
from mailbag.storage.memory import MemoryStore
from tests.storage.helpers import read_all, run


def test_seed_and_contents() -> None:
    store = MemoryStore()
    uids = store.seed("alice", b"one\n", b"two\n")
    assert store.contents("alice") == {uids[0]: b"one\n", uids[1]: b"two\n"}
    assert store.contents("nobody") == {}


def test_fail_next_raises_once_per_operation() -> None:
    store = MemoryStore()
    (uid,) = store.seed("alice", b"x\n")
    store.fail_next("open")
    with pytest.raises(StorageError, match="injected open failure"):
        run(store.open_maildrop("alice"))
    assert not store.is_locked("alice")

    async def go() -> None:
        md = await store.open_maildrop("alice")
        store.fail_next("read", MaildropLocked("custom"))
        with pytest.raises(MaildropLocked):
            await read_all(md, uid)
        assert await read_all(md, uid) == b"x\n"
        store.fail_next("delete")
        with pytest.raises(StorageError):
            await md.delete([uid])
        assert store.contents("alice") == {uid: b"x\n"}
        await md.close()

    run(go())
    store.fail_next("deliver")
    with pytest.raises(StorageError):
        run(store.deliver("alice", b"y\n"))
    store.fail_next("usage")
    with pytest.raises(StorageError):
        run(store.usage("alice"))


def test_fail_delete_of_reports_partial_failure() -> None:
    store = MemoryStore()
    a, b = store.seed("alice", b"a\n", b"b\n")
    store.fail_delete_of(a)

    async def go() -> None:
        async with await store.open_maildrop("alice") as md:
            result = await md.delete([a, b])
        assert (result.deleted, result.failed) == (1, (a,))

    run(go())
    assert list(store.contents("alice")) == [a]
    assert not store.is_locked("alice")

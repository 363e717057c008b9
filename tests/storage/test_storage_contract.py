"""The storage contract (storage/base.py), run against every backend.

A session test on ``MemoryStore`` is only worth something if Memory and
Maildir behave alike, so everything the session relies on is asserted here
once, for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbag.errors import InvalidUsername, MaildropLocked, MessageGone, StorageError
from mailbag.storage.base import (
    DeleteResult,
    ImportMessage,
    ImportOptions,
    ImportResult,
    Store,
    Usage,
)
from mailbag.wireform import to_wire
from tests.storage.helpers import read_all, run

SAMPLES = [
    b"Subject: one\n\nHello\n",
    b"Subject: crlf\r\n\r\nstored with CRLF\r\n",
    b"Subject: no final newline\n\nno newline at end",
    b"Subject: =?GBK?B?1tDOxA==?=\n\n\xd6\xd0\xce\xc4 8-bit GBK\n",
    b"",
    b"lone CR at the end\r",
    b"mixed\r\nendings\nand a lone\rCR\n",
]


async def _deliver_all(store: Store, user: str, messages: list[bytes]) -> list[str]:
    return [await store.deliver(user, m) for m in messages]


def test_open_empty_maildrop(store: Store) -> None:
    async def go() -> None:
        md = await store.open_maildrop("alice")
        assert list(md.messages) == []
        await md.close()
        assert await store.usage("alice") == Usage(0, 0)

    run(go())


def test_deliver_then_list_read_in_arrival_order(store: Store) -> None:
    async def go() -> None:
        uids = await _deliver_all(store, "alice", SAMPLES)
        md = await store.open_maildrop("alice")
        try:
            assert [m.uid for m in md.messages] == uids
            for info, original in zip(md.messages, SAMPLES, strict=True):
                assert info.size == len(to_wire(original))
                assert await read_all(md, info.uid) == original
        finally:
            await md.close()

    run(go())


def test_read_streams_in_chunks_of_requested_size(store: Store) -> None:
    message = b"x" * 1000 + b"\n"

    async def go() -> None:
        uid = await store.deliver("alice", message)
        md = await store.open_maildrop("alice")
        try:
            chunks = [c async for c in md.read(uid, chunk_size=64)]
            assert b"".join(chunks) == message
            assert all(0 < len(c) <= 64 for c in chunks)
            assert len(chunks) > 1
        finally:
            await md.close()

    run(go())


def test_read_with_non_positive_chunk_size_is_refused(store: Store) -> None:
    async def go() -> None:
        uid = await store.deliver("alice", b"x\n")
        md = await store.open_maildrop("alice")
        try:
            with pytest.raises(ValueError):
                await read_all(md, uid, chunk_size=0)
        finally:
            await md.close()

    run(go())


def test_read_unknown_uid_raises_message_gone(store: Store) -> None:
    async def go() -> None:
        md = await store.open_maildrop("alice")
        try:
            with pytest.raises(MessageGone):
                await read_all(md, "no-such-uid")
        finally:
            await md.close()

    run(go())


def test_delete_removes_for_next_session(store: Store) -> None:
    async def go() -> None:
        uids = await _deliver_all(store, "alice", SAMPLES[:3])
        md = await store.open_maildrop("alice")
        result = await md.delete([uids[0], uids[2]])
        await md.close()
        assert result == DeleteResult(deleted=2, failed=())
        md = await store.open_maildrop("alice")
        try:
            assert [m.uid for m in md.messages] == [uids[1]]
            assert await read_all(md, uids[1]) == SAMPLES[1]
        finally:
            await md.close()
        assert await store.usage("alice") == Usage(1, len(to_wire(SAMPLES[1])))

    run(go())


def test_delete_unknown_uid_is_reported_failed(store: Store) -> None:
    async def go() -> None:
        (uid,) = await _deliver_all(store, "alice", SAMPLES[:1])
        md = await store.open_maildrop("alice")
        try:
            result = await md.delete([uid, "not-in-snapshot"])
        finally:
            await md.close()
        assert result.deleted == 1
        assert result.failed == ("not-in-snapshot",)

    run(go())


def test_snapshot_does_not_see_deliveries_until_reopen(store: Store) -> None:
    async def go() -> None:
        first = await store.deliver("alice", b"first\n")
        md = await store.open_maildrop("alice")
        late = await store.deliver("alice", b"late\n")
        assert [m.uid for m in md.messages] == [first]
        await md.delete([first])
        await md.close()
        md = await store.open_maildrop("alice")
        try:
            assert [m.uid for m in md.messages] == [late]
        finally:
            await md.close()

    run(go())


def test_open_twice_raises_maildrop_locked(store: Store) -> None:
    async def go() -> None:
        md = await store.open_maildrop("alice")
        with pytest.raises(MaildropLocked):
            await store.open_maildrop("alice")
        other = await store.open_maildrop("bob")  # locks are per user
        await other.close()
        await md.close()
        await md.close()  # idempotent
        again = await store.open_maildrop("alice")
        await again.close()

    run(go())


def test_maildrop_locked_is_a_storage_error() -> None:
    assert issubclass(MaildropLocked, StorageError)


def test_read_after_close_raises_storage_error(store: Store) -> None:
    async def go() -> None:
        uid = await store.deliver("alice", b"x\n")
        md = await store.open_maildrop("alice")
        await md.close()
        with pytest.raises(StorageError):
            await read_all(md, uid)
        with pytest.raises(StorageError):
            await md.delete([uid])

    run(go())


def test_uidls_unique_stable_and_in_charset(store: Store) -> None:
    async def go() -> None:
        uids = await _deliver_all(store, "alice", [b"same\n"] * 20)
        assert len(set(uids)) == 20
        for uid in uids:
            assert 1 <= len(uid) <= 70
            assert all(0x21 <= ord(c) <= 0x7E for c in uid)
        for _ in range(2):
            md = await store.open_maildrop("alice")
            assert [m.uid for m in md.messages] == uids
            await md.close()
        md = await store.open_maildrop("alice")
        await md.delete(uids[:5])  # deleting others keeps the rest stable
        await md.close()
        md = await store.open_maildrop("alice")
        assert [m.uid for m in md.messages] == uids[5:]
        await md.close()

    run(go())


def test_usage_counts_wire_octets(store: Store) -> None:
    async def go() -> None:
        await _deliver_all(store, "alice", SAMPLES)
        expected = Usage(len(SAMPLES), sum(len(to_wire(m)) for m in SAMPLES))
        assert await store.usage("alice") == expected
        assert await store.usage("nobody") == Usage(0, 0)

    run(go())


@pytest.mark.parametrize("user", ["", "..", ".", "../evil", "a/b", "x\0y", "bob@..", "ctl\n"])
def test_unsafe_user_names_are_refused(store: Store, user: str) -> None:
    async def go() -> None:
        with pytest.raises(InvalidUsername):
            await store.open_maildrop(user)
        with pytest.raises(InvalidUsername):
            await store.deliver(user, b"x\n")

    run(go())


@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_sizes_equal_wire_form_length(store: Store, messages: list[bytes]) -> None:
    async def go() -> None:
        md = await store.open_maildrop("prop")
        await md.delete([m.uid for m in md.messages])
        await md.close()
        await _deliver_all(store, "prop", messages)
        md = await store.open_maildrop("prop")
        try:
            assert [m.size for m in md.messages] == [len(to_wire(m)) for m in messages]
            assert [await read_all(md, m.uid, 7) for m in md.messages] == messages
        finally:
            await md.close()

    run(go())


# -- import (Store.import_messages): what `mailbag migrate` relies on -----------------
# UIDLs kept exactly, never reused, nothing stored twice when a migration runs again.

SOURCE = [
    ("1700000000.M1P1.old,S=20", "0000000100000007", b"Subject: a\n\nfirst\n"),
    ("1700000100.M2P1.old", "dovecot-uidl-2", b"Subject: b\r\n\r\nsecond\r\n"),
    ("key with spaces/and:colons", "x:y/z", b"no final newline"),
    ("1700000200.M3P1.old", None, b"Subject: c\n\nno kept UIDL\n"),
]


def _reader(data: bytes) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        return data

    return read


async def _source(items: Iterable[tuple[str, str | None, bytes]]) -> AsyncIterator[ImportMessage]:
    for key, uid, data in items:
        yield ImportMessage(key=key, uid=uid, read=_reader(data), flags="S")


def _import(store: Store, items: Iterable[tuple[str, str | None, bytes]],
            **options: bool) -> ImportResult:
    return run(store.import_messages("alice", _source(items), ImportOptions(**options)))


def _listing(store: Store) -> list[tuple[str, int, bytes]]:
    async def go() -> list[tuple[str, int, bytes]]:
        md = await store.open_maildrop("alice")
        try:
            return [(m.uid, m.size, await read_all(md, m.uid)) for m in md.messages]
        finally:
            await md.close()

    return run(go())


def test_import_keeps_uidls_exactly_after_existing_mail_in_order(store: Store) -> None:
    earlier = run(store.deliver("alice", b"Subject: delivered first\n\nx\n"))
    result = _import(store, SOURCE)
    assert (result.imported, result.present, result.conflicts) == (4, 0, 0)
    listing = _listing(store)
    assert [uid for uid, _, _ in listing] == [earlier, *result.uids]
    assert result.uids[:3] == ["0000000100000007", "dovecot-uidl-2", "x:y/z"]
    own = result.uids[3]
    assert own not in {earlier, *result.uids[:3]}
    for (_, size, data), (_, _, original) in zip(listing[1:], SOURCE, strict=True):
        assert data == original and size == len(to_wire(original))


def test_import_twice_stores_nothing_twice(store: Store) -> None:
    first = _import(store, SOURCE)
    before = _listing(store)
    second = _import(store, SOURCE)
    assert (second.imported, second.present, second.conflicts) == (0, 4, 0)
    assert second.uids == first.uids  # the backend's own UIDL is stable too
    assert _listing(store) == before


def test_import_resumes_after_a_partial_run(store: Store) -> None:
    _import(store, SOURCE[:2])
    rest = _import(store, SOURCE)
    assert (rest.imported, rest.present) == (2, 2)
    assert [uid for uid, _, _ in _listing(store)] == rest.uids


def test_imported_uidl_is_never_reused(store: Store) -> None:
    result = _import(store, SOURCE)
    delivered = run(store.deliver("alice", b"Subject: later\n\n"))
    assert delivered not in result.uids
    # The same UIDL for another source message is refused (the message still arrives).
    clash = _import(store, [("other-key", "dovecot-uidl-2", b"Subject: clash\n\n")])
    assert clash.imported == 1 and clash.uids[0] != "dovecot-uidl-2"
    assert any("already used" in w for w in clash.warnings)
    uids = [uid for uid, _, _ in _listing(store)]
    assert len(uids) == len(set(uids)) == 6


def test_imported_then_deleted_is_not_brought_back(store: Store) -> None:
    result = _import(store, SOURCE)

    async def delete_first() -> None:
        md = await store.open_maildrop("alice")
        try:
            await md.delete([result.uids[0]])
        finally:
            await md.close()

    run(delete_first())
    again = _import(store, SOURCE)
    assert (again.imported, again.present) == (0, 3)
    assert any("deleted since" in w for w in again.warnings)
    assert result.uids[0] not in [uid for uid, _, _ in _listing(store)]


def test_import_conflicting_uidl_kept_unless_replaced(store: Store) -> None:
    _import(store, SOURCE[:1])
    changed = [(SOURCE[0][0], "another-uidl", SOURCE[0][2])]
    kept = _import(store, changed)
    assert (kept.present, kept.conflicts, kept.uids) == (1, 1, ["0000000100000007"])
    replaced = _import(store, changed, replace_uids=True)
    assert (replaced.conflicts, replaced.uids) == (1, ["another-uidl"])
    assert [uid for uid, _, _ in _listing(store)] == ["another-uidl"]


def test_import_invalid_uidl_gets_backend_uidl(store: Store) -> None:
    result = _import(store, [("k1", "has space", b"x\n"), ("k2", "x" * 71, b"y\n")])
    assert result.imported == 2
    assert "has space" not in result.uids and "x" * 71 not in result.uids
    assert sum("not valid POP3" in w for w in result.warnings) == 2


def test_import_dry_run_changes_nothing(store: Store) -> None:
    _import(store, SOURCE[:1])
    before = _listing(store)
    dry = _import(store, SOURCE, dry_run=True)
    assert (dry.imported, dry.present) == (3, 1)
    assert _listing(store) == before


def test_import_into_locked_maildrop_is_refused(store: Store) -> None:
    async def go() -> None:
        md = await store.open_maildrop("alice")
        try:
            with pytest.raises(MaildropLocked):
                await store.import_messages("alice", _source(SOURCE))
        finally:
            await md.close()
        result = await store.import_messages("alice", _source(SOURCE))
        assert result.imported == 4

    run(go())

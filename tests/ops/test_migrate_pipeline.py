"""The generic migration pipeline: a ``Store`` read through its interface -> another ``Store``.

This is the shape of ``mailbag migrate maildir postgres`` (and back): no
backend is named by the pipeline, UIDLs and order survive, a re-run copies
nothing, and the result is verified by opening the target like a session.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailbag.errors import MailbagError
from mailbag.migrate.pipeline import StoreSource, import_user, served_uids, verify
from mailbag.storage.base import ImportOptions, Store
from mailbag.storage.maildir import MaildirStore
from mailbag.storage.memory import MemoryStore

MESSAGES = [b"Subject: one\n\n1\n", b"Subject: two\r\n\r\n2\r\n", b"", b"x" * 300_000]


@pytest.mark.parametrize("direction", ["maildir->memory", "memory->maildir"])
def test_store_to_store_keeps_uidls_order_and_bytes(tmp_path: Path, direction: str) -> None:
    maildir = MaildirStore(str(tmp_path / "mail" / "{user}"))
    memory = MemoryStore()
    source: Store = maildir if direction.startswith("maildir") else memory
    target: Store = memory if source is maildir else maildir

    async def go() -> None:
        uids = [await source.deliver("bob", m) for m in MESSAGES]
        result, verified = await import_user(
            target, "bob", StoreSource(source).messages("bob"), ImportOptions())
        assert verified and result.imported == len(MESSAGES) and result.uids == uids
        assert await served_uids(target, "bob") == uids
        md = await target.open_maildrop("bob")
        try:
            for uid, original in zip(uids, MESSAGES, strict=True):
                assert b"".join([c async for c in md.read(uid)]) == original
        finally:
            await md.close()
        again, _ = await import_user(
            target, "bob", StoreSource(source).messages("bob"), ImportOptions())
        assert (again.imported, again.present) == (0, len(MESSAGES))
        # New mail at the source after the first run is picked up by the next one.
        late = await source.deliver("bob", b"Subject: late\n\n")
        third, _ = await import_user(
            target, "bob", StoreSource(source).messages("bob"), ImportOptions())
        assert third.imported == 1 and third.uids[-1] == late

    asyncio.run(go())


def test_verify_refuses_a_missing_or_reordered_uidl() -> None:
    store = MemoryStore()
    uids = store.seed("carol", b"a\n", b"b\n")

    async def go() -> None:
        await verify(store, "carol", uids)
        with pytest.raises(MailbagError, match="1 missing"):
            await verify(store, "carol", [*uids, "gone"])
        with pytest.raises(MailbagError, match="another order"):
            await verify(store, "carol", uids[::-1])

    asyncio.run(go())


def test_progress_is_reported_while_importing() -> None:
    source, target = MemoryStore(), MemoryStore()
    source.seed("dave", *[b"m\n"] * 5)
    seen: list[int] = []

    async def go() -> None:
        from mailbag.migrate import pipeline

        messages = pipeline.counted(StoreSource(source).messages("dave"), seen.append, every=2)
        await target.import_messages("dave", messages)

    asyncio.run(go())
    assert seen == [2, 4]

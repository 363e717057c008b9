"""The generic migration pipeline: any source of messages -> any ``Store``.

A source yields, per user, ``ImportMessage``s (the bytes on demand, the
UIDL to keep, flags, arrival time) in the order a POP3 client saw them.
The pipeline hands them to ``Store.import_messages`` (the backend does the
locking, the atomic writes and the bookkeeping of kept UIDLs) and then
proves the result: it opens the maildrop the way the POP3 server will and
checks that the imported messages are listed with exactly the expected
UIDLs, in the expected order.

Nothing here knows which backend it writes to, so ``mailbag migrate`` works
unchanged for every backend the registry offers.  Two sources exist:
Dovecot Maildirs (``migrate.run``) and any ``Store`` (``StoreSource``:
``mailbag migrate maildir postgres`` and back reads one store through the
interface and writes the other).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from mailbag.errors import MailbagError
from mailbag.storage.base import ImportMessage, ImportOptions, ImportResult, Maildrop, Store

#: Report progress every this many messages of one user.
PROGRESS_EVERY = 5000

Progress = Callable[[int], None]


async def counted(
    messages: AsyncIterable[ImportMessage], progress: Progress, every: int = PROGRESS_EVERY
) -> AsyncIterator[ImportMessage]:
    """Pass ``messages`` through, calling ``progress(n)`` every ``every`` messages."""
    done = 0
    async for message in messages:
        yield message
        done += 1
        if done % every == 0:
            progress(done)


async def served_uids(store: Store, user: str) -> list[str]:
    """The UIDLs a POP3 session would list for ``user`` now, in order."""
    maildrop = await store.open_maildrop(user)
    try:
        return [m.uid for m in maildrop.messages]
    finally:
        await maildrop.close()


async def verify(store: Store, user: str, expected: list[str]) -> None:
    """Raise unless ``user``'s maildrop lists ``expected`` (among others) in this order."""
    served = await served_uids(store, user)
    wanted = set(expected)
    served_migrated = [uid for uid in served if uid in wanted]
    if served_migrated != expected:
        missing = len(wanted - set(served))
        raise MailbagError(
            f"verification failed: mailbag would list {len(served_migrated)} of "
            f"{len(expected)} migrated messages ({missing} missing) or in another order"
        )


async def import_user(
    store: Store,
    user: str,
    messages: AsyncIterable[ImportMessage],
    options: ImportOptions,
    progress: Progress = lambda _n: None,
) -> tuple[ImportResult, bool]:
    """Import one user's messages, then verify (not in a dry run).

    Returns the import result and whether it was verified.
    """
    result = await store.import_messages(user, counted(messages, progress), options)
    if options.dry_run:
        return result, False
    await verify(store, user, result.uids)
    return result, True


@dataclass(frozen=True, slots=True)
class StoreSource:
    """Messages read from another ``Store`` through its interface.

    The key of each message is its UIDL (stable and unique by the store
    contract), so a re-run finds what an earlier run imported; the UIDL is
    kept as is.  The source maildrop is locked while it is read.
    """

    store: Store
    chunk_size: int = 1 << 20

    async def messages(
        self, user: str, on_open: Progress = lambda _n: None
    ) -> AsyncGenerator[ImportMessage, None]:
        """``user``'s messages, in the source's order; ``on_open(count)`` once it is open."""
        maildrop = await self.store.open_maildrop(user)
        try:
            on_open(len(maildrop.messages))
            for info in maildrop.messages:
                yield ImportMessage(key=info.uid, uid=info.uid,
                                    read=_reader(maildrop, info.uid, self.chunk_size))
        finally:
            await maildrop.close()


def _reader(maildrop: Maildrop, uid: str, chunk_size: int) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        return b"".join([chunk async for chunk in maildrop.read(uid, chunk_size=chunk_size)])

    return read


"""An in-memory store with the same contract as Maildir, for session tests.

It passes the same contract suite as ``MaildirStore`` (tests/storage), so a
session test that passes here tests the session, not a simplification.  On
top of the contract it lets a test seed messages synchronously, look at what
is stored, and inject failures (``fail_next``, ``fail_delete_of``) to drive
the session's error paths (``-ERR [SYS/TEMP]``, partial deletes at QUIT).
Nothing here blocks, so nothing runs in threads.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from types import TracebackType
from typing import Literal

from mailbag.errors import MaildropLocked, MessageGone, StorageError
from mailbag.storage.base import (
    DeleteResult,
    ImportMessage,
    ImportOptions,
    ImportResult,
    MessageInfo,
    Usage,
)
from mailbag.storage.maildir_names import is_valid_uidl, split_user
from mailbag.wireform import wire_size

Operation = Literal["open", "read", "delete", "deliver", "usage", "import"]


class MemoryStore:
    """Maildrops as ordered ``uid -> bytes`` dicts, with Maildir-like locking."""

    def __init__(self) -> None:
        self._boxes: dict[str, dict[str, bytes]] = {}
        self._locked: set[str] = set()
        self._counter = itertools.count(1)
        self._failures: dict[str, StorageError] = {}
        self._fail_delete: set[str] = set()
        #: Every UIDL ever used per user (deleted ones too): never handed out again.
        self._used: dict[str, set[str]] = {}
        #: Imported source keys per user -> (UIDL, kept from the source?); outlives deletion.
        self._imported: dict[str, dict[str, tuple[str, bool]]] = {}

    # -- test helpers --------------------------------------------------------

    def seed(self, user: str, *messages: bytes) -> list[str]:
        """Store messages synchronously (test setup); return their UIDLs."""
        return [self._store(user, m) for m in messages]

    def contents(self, user: str) -> dict[str, bytes]:
        """A copy of what ``user`` has stored, in arrival order."""
        return dict(self._boxes.get(user, {}))

    def is_locked(self, user: str) -> bool:
        """True while a maildrop of ``user`` is open."""
        return user in self._locked

    def fail_next(self, operation: Operation, error: StorageError | None = None) -> None:
        """Make the next ``operation`` (on any user) raise ``error``.

        The default is a plain StorageError, which the session must answer
        with ``-ERR [SYS/TEMP]``.
        """
        self._failures[operation] = error or StorageError(f"injected {operation} failure")

    def fail_delete_of(self, *uids: str) -> None:
        """Make the next ``delete`` report these UIDLs as failed (and keep them)."""
        self._fail_delete.update(uids)

    def _check_failure(self, operation: Operation) -> None:
        error = self._failures.pop(operation, None)
        if error is not None:
            raise error

    def _store(self, user: str, message: bytes, uid: str | None = None) -> str:
        split_user(user)
        used = self._used.setdefault(user, set())
        while uid is None or uid in used:
            uid = f"mem-{next(self._counter)}"
        used.add(uid)
        self._boxes.setdefault(user, {})[uid] = bytes(message)
        return uid

    # -- Store interface -----------------------------------------------------

    async def open_maildrop(self, user: str) -> MemoryMaildrop:
        """Lock and snapshot; a second open before ``close`` raises MaildropLocked."""
        split_user(user)
        self._check_failure("open")
        if user in self._locked:
            raise MaildropLocked(f"maildrop of {user!r} is in use")
        self._locked.add(user)
        box = self._boxes.setdefault(user, {})
        snapshot = tuple(MessageInfo(uid, wire_size([data])) for uid, data in box.items())
        return MemoryMaildrop(self, user, snapshot)

    async def deliver(self, user: str, message: bytes) -> str:
        """Append the message; visible from the next ``open_maildrop`` on."""
        self._check_failure("deliver")
        return self._store(user, message)

    async def usage(self, user: str) -> Usage:
        """Messages and wire octets stored for ``user``."""
        split_user(user)
        self._check_failure("usage")
        box = self._boxes.get(user, {})
        return Usage(len(box), sum(wire_size([m]) for m in box.values()))

    async def import_messages(
        self,
        user: str,
        messages: AsyncIterable[ImportMessage],
        options: ImportOptions | None = None,
    ) -> ImportResult:
        """Import with the same rules as Maildir (see ``Store.import_messages``)."""
        options = options or ImportOptions()
        split_user(user)
        self._check_failure("import")
        if user in self._locked:
            raise MaildropLocked(f"maildrop of {user!r} is in use")
        self._locked.add(user)
        try:
            result = ImportResult()
            imported = self._imported.setdefault(user, {})
            used = self._used.setdefault(user, set())
            box = self._box(user)
            deleted_since = 0
            async for message in messages:
                uid = message.uid if message.uid and is_valid_uidl(message.uid) else None
                if message.uid is not None and uid is None:
                    result.warnings.append(f"UIDL {message.uid!r} of {message.key} is not "
                                           "valid POP3; mailbag's own UIDL is used")
                known = imported.get(message.key)
                if known is not None and known[0] not in box:
                    deleted_since += 1
                    continue
                if known is not None:
                    result.present += 1
                    served, kept = known
                    if uid is not None and uid != served:
                        result.conflicts += kept
                        change = (not kept or options.replace_uids) and uid not in used
                        if change and not options.dry_run:
                            box = self._boxes[user] = {
                                (uid if u == served else u): m for u, m in box.items()
                            }
                            used.add(uid)
                            imported[message.key] = (uid, True)
                            served = uid
                    result.uids.append(served)
                    continue
                if uid is not None and uid in used:
                    result.warnings.append(f"UIDL {uid!r} of {message.key} is already used by "
                                           "another message; mailbag uses its own")
                    uid = None
                result.imported += 1
                if options.dry_run:
                    result.uids.append(uid or "?")
                    continue
                served = self._store(user, await message.read(), uid)
                imported[message.key] = (served, uid is not None)
                result.uids.append(served)
            if deleted_since:
                result.warnings.append(f"{deleted_since} messages were imported before and "
                                       "deleted since: not brought back")
            return result
        finally:
            self._locked.discard(user)

    def _release(self, user: str) -> None:
        self._locked.discard(user)

    def _box(self, user: str) -> dict[str, bytes]:
        return self._boxes.setdefault(user, {})


class MemoryMaildrop:
    """One open, locked in-memory maildrop."""

    def __init__(self, store: MemoryStore, user: str, snapshot: tuple[MessageInfo, ...]) -> None:
        self._store = store
        self._user = user
        self._messages = snapshot
        self._uids = frozenset(m.uid for m in snapshot)
        self._closed = False

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open."""
        return self._messages

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"maildrop of {self._user!r} is closed")

    async def read(self, uid: str, *, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """Yield the stored bytes in ``chunk_size`` slices, yielding to the loop between."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self._check_open()
        self._store._check_failure("read")
        data = self._store._box(self._user).get(uid) if uid in self._uids else None
        if data is None:
            raise MessageGone(f"no message {uid}")
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]
            await asyncio.sleep(0)

    async def delete(self, uids: Sequence[str]) -> DeleteResult:
        """Remove messages; already-gone ones count as deleted."""
        self._check_open()
        self._store._check_failure("delete")
        box = self._store._box(self._user)
        deleted = 0
        failed: list[str] = []
        for uid in uids:
            if uid not in self._uids or uid in self._store._fail_delete:
                failed.append(uid)
                continue
            box.pop(uid, None)
            deleted += 1
        self._store._fail_delete.clear()
        return DeleteResult(deleted, tuple(failed))

    async def close(self) -> None:
        """Release the lock; safe to call more than once."""
        if not self._closed:
            self._closed = True
            self._store._release(self._user)

    async def __aenter__(self) -> MemoryMaildrop:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

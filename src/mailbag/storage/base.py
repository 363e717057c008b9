"""The storage interface every backend implements.

The POP3 session needs exactly four things from storage: open and lock one
user's maildrop, list its messages with a stable UIDL and exact wire size,
stream a message's bytes, and delete a set of messages once, at QUIT.
Delivery needs one more: store a new message atomically.  Keeping the
interface this small is what lets a database backend follow without touching
protocol or session code (DESIGN.md rule 6).

Numbering: ``uid`` is the stable UIDL string; the session maps its own
1-based message numbers onto the snapshot order returned by ``messages``.

Migration adds one operation, ``import_messages``: bring messages in from
another server or store keeping their UIDLs, idempotently, under the
backend's own lock and atomic writes.  ``mailbag migrate`` uses nothing else,
so it works unchanged for every backend.

What only some backends can do is a separate, optional capability Protocol
(``SelfCheck``, ``FileOwner``): callers test ``isinstance`` and skip what a
backend does not offer, instead of naming the backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, overload, runtime_checkable

from mailbag.errors import QuotaExceeded, StorageError
from mailbag.wireform import wire_size


class MessageInfo(NamedTuple):
    """One message as the POP3 session sees it.

    ``size`` is the number of octets RETR sends before dot-stuffing: the
    message with every line ending as CRLF and a final CRLF if the stored
    message lacks one (RFC 1939 section 11: sizes are in "exact" octets).
    ``uid`` is 1-70 characters in 0x21-0x7E, unique within the maildrop,
    never reused, and stable across sessions and index loss.

    A named tuple, not a dataclass: a 100,000-message maildrop builds
    100,000 of these at every open, and a frozen dataclass's ``__init__``
    (one ``object.__setattr__`` per field) was the largest single cost of
    an indexed open.
    """

    uid: str
    size: int


class MessageList(Sequence[MessageInfo]):
    """A snapshot kept as two columns, ``uids`` and ``sizes``; items are built on access.

    A big maildrop would otherwise build one long-lived object per message
    at every open, and 100,000 of those cost more than reading the index
    (they also keep the garbage collector busy).  Readers that want a whole
    column (a POP3 snapshot, a UIDL listing) can take ``uids`` and
    ``sizes`` directly; both must be treated as read-only.
    """

    __slots__ = ("sizes", "uids")

    def __init__(self, uids: Sequence[str], sizes: Sequence[int]) -> None:
        if len(uids) != len(sizes):
            raise ValueError("uids and sizes differ in length")
        self.uids = uids
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.uids)

    @overload
    def __getitem__(self, index: int) -> MessageInfo: ...

    @overload
    def __getitem__(self, index: slice) -> MessageList: ...

    def __getitem__(self, index: int | slice) -> MessageInfo | MessageList:
        if isinstance(index, slice):
            return MessageList(self.uids[index], self.sizes[index])
        return MessageInfo(self.uids[index], self.sizes[index])

    def __iter__(self) -> Iterator[MessageInfo]:
        return map(MessageInfo, self.uids, self.sizes)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MessageList):
            return list(self.uids) == list(other.uids) and list(self.sizes) == list(other.sizes)
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable columns: not hashable

    def __repr__(self) -> str:
        return f"MessageList({len(self)} messages)"


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """What ``Maildrop.delete`` managed to remove."""

    deleted: int
    failed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """Current size of a maildrop, for quotas and ``user list``."""

    messages: int
    octets: int


@dataclass(frozen=True, slots=True)
class ImportMessage:
    """One message brought in from elsewhere (``Store.import_messages``).

    ``key`` names the message in its source and is stable across runs (a
    Maildir base name, a source UIDL); a message whose key the maildrop
    already holds is not stored again, which is what makes a migration
    resumable.  ``uid`` is the UIDL to keep, served exactly from then on;
    None lets the backend choose its own (stable) one.  ``read`` returns the
    message bytes and is only called when the message is actually stored.
    ``flags`` are Maildir/IMAP flag letters ("S" seen, "R" replied, ...);
    None means never seen by a mail reader (Maildir ``new/``).
    ``received`` is the arrival time (Unix seconds) when the source knows it.
    ``path`` is a hint: a file holding exactly these bytes, which a
    file-based backend may hard-link (``ImportOptions.link``).
    """

    key: str
    read: Callable[[], Awaitable[bytes]]
    uid: str | None = None
    flags: str | None = None
    received: float | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """How ``import_messages`` treats what it finds."""

    #: Report what would happen, change nothing.
    dry_run: bool = False
    #: A message already there under a different kept UIDL gets the new one
    #: (only right when the earlier import used the wrong UIDLs and no client saw them).
    replace_uids: bool = False
    #: Hard-link ``ImportMessage.path`` instead of copying, where the backend can.
    link: bool = False


@dataclass(slots=True)
class ImportResult:
    """What ``import_messages`` did (or, in a dry run, would do)."""

    #: Messages stored by this call.
    imported: int = 0
    #: Messages the maildrop already held (same key): not stored again.
    present: int = 0
    #: Present messages that were served under another kept UIDL than the one given.
    conflicts: int = 0
    #: The UIDL served for each message given, in the order given (for verification).
    uids: list[str] = field(default_factory=list)
    #: Things an administrator should read (one line each).
    warnings: list[str] = field(default_factory=list)


class Maildrop(Protocol):
    """One user's locked maildrop for the duration of a POP3 session.

    The message list is a snapshot taken when the maildrop was opened:
    messages delivered afterwards appear only in the next session
    (RFC 1939 section 4: message numbers are fixed for the session).
    """

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot, in arrival order; index 0 is message number 1."""
        ...

    def read(self, uid: str, *, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """Yield the stored bytes of a message, unmodified, in chunks.

        The session converts line endings and dot-stuffs; storage returns the
        message exactly as stored.  Raises ``MessageGone`` if it vanished.
        """
        ...

    async def delete(self, uids: Sequence[str]) -> DeleteResult:
        """Remove these messages permanently (called only in UPDATE state)."""
        ...

    async def close(self) -> None:
        """Release the lock.  Safe to call more than once."""
        ...


class Store(Protocol):
    """A storage backend: where every user's maildrop lives."""

    async def open_maildrop(self, user: str) -> Maildrop:
        """Open and lock ``user``'s maildrop, creating it if needed.

        Raises ``MaildropLocked`` when another session holds it and
        ``StorageError`` when the storage itself fails.
        """
        ...

    async def deliver(self, user: str, message: bytes) -> str:
        """Store one message atomically for ``user``; return its UIDL.

        Atomic means a reader sees the whole message or nothing, and a crash
        at any point leaves no partial message visible.
        """
        ...

    async def usage(self, user: str) -> Usage:
        """Messages and octets currently stored for ``user``."""
        ...

    async def import_messages(
        self,
        user: str,
        messages: AsyncIterable[ImportMessage],
        options: ImportOptions | None = None,
    ) -> ImportResult:
        """Bring ``messages`` into ``user``'s maildrop, in this order, keeping UIDLs.

        Holds the maildrop's lock for the whole call (``MaildropLocked`` if
        a session has it).  Contract:

        * each stored message is written atomically, as by ``deliver``, and
          appended after what the maildrop holds, in the order given;
        * a given ``uid`` is what UIDL reports for it, exactly; a ``uid``
          another message already has is not used twice (the message gets
          the backend's own UIDL, with a warning), and ``deliver`` never
          hands out a UIDL that import kept;
        * a key already present is not stored again; if it was served under
          another kept UIDL that one stays (``conflicts``) unless
          ``options.replace_uids``;
        * running the same import twice changes nothing the second time.
        """
        ...


@runtime_checkable
class SelfCheck(Protocol):
    """Optional: a backend that can say whether it is usable before serving.

    The Maildir backend checks its mail root; a database backend would check
    its connection and schema.  Errors are ``ConfigError`` naming the setting.
    """

    def prepare(self) -> None:
        """Create what must exist before serving (e.g. the mail root); raise if impossible."""
        ...

    def check(self) -> str:
        """Read-only version of ``prepare`` for ``mailbag check``: one line on success."""
        ...

    def problems(self) -> list[str]:
        """Cheap, repeatable health probe (``/healthz``, after a privilege drop): [] when fine."""
        ...


@runtime_checkable
class FileOwner(Protocol):
    """Optional: a backend that creates files, told whom they must belong to.

    ``mailbag migrate`` runs as root (it reads another server's files) but
    what it creates must belong to the account the server runs as.
    """

    def set_owner(self, uid: int, gid: int) -> None:
        """Files and directories created from now on get this owner."""
        ...

@dataclass(frozen=True, slots=True)
class Delivery:
    """One message for one recipient, with the quota to enforce (0 = no limit).

    Backends that can check the quota in the same transaction as the write
    (``MultiDelivery``) make two deliveries at once, on any node, unable to
    overshoot it.
    """

    user: str
    message: bytes
    max_octets: int = 0
    max_messages: int = 0


@runtime_checkable
class MultiDelivery(Protocol):
    """Optional: store messages for several recipients in one transaction.

    Returns, per delivery and in order, the new UIDL or the error that
    refused that recipient alone (``QuotaExceeded``); the accepted ones are
    committed together.  A failure of the storage itself raises and commits
    nothing.
    """

    async def deliver_many(self, deliveries: Sequence[Delivery]) -> list[str | StorageError]:
        """Deliver all of ``deliveries`` atomically (see the class docstring)."""
        ...


async def deliver_many(store: Store, deliveries: Sequence[Delivery]) -> list[str | StorageError]:
    """Deliver through the backend's ``deliver_many`` when it has one, else one by one.

    The fallback checks quotas against ``usage`` first, which is exact for a
    single process (the caller serialises per user) but not across nodes;
    that is why shared backends implement ``MultiDelivery``.
    """
    if isinstance(store, MultiDelivery):
        return await store.deliver_many(deliveries)
    results: list[str | StorageError] = []
    for d in deliveries:
        if d.max_octets or d.max_messages:
            usage = await store.usage(d.user)
            size = wire_size([d.message])
            if (d.max_messages and usage.messages + 1 > d.max_messages) or (
                d.max_octets and usage.octets + size > d.max_octets
            ):
                results.append(QuotaExceeded(f"{d.user}: over quota"))
                continue
        results.append(await store.deliver(d.user, d.message))
    return results


@runtime_checkable
class WholeReader(Protocol):
    """Optional, on a ``Maildrop``: read a small message in one call.

    A POP3 session retrieving many small messages spends more on the steps
    of a chunk stream (an async iterator, one storage call per chunk plus the
    one that finds the end) than on the bytes.  A maildrop that can tell a
    message's stored size at open returns all of it at once, or None when
    it is larger than ``limit`` (the caller then streams with ``read``).
    Raises ``MessageGone`` / ``StorageError`` like ``read``.
    """

    async def read_whole(self, uid: str, limit: int) -> bytes | None:
        """The stored bytes of a message of at most ``limit`` octets, else None."""
        ...

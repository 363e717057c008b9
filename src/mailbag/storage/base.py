"""The storage interface every backend implements.

The POP3 session needs exactly four things from storage: open and lock one
user's maildrop, list its messages with a stable UIDL and exact wire size,
stream a message's bytes, and delete a set of messages once, at QUIT.
Delivery needs one more: store a new message atomically.  Keeping the
interface this small is what lets a database backend follow without touching
protocol or session code (DESIGN.md rule 6).

Numbering: ``uid`` is the stable UIDL string; the session maps its own
1-based message numbers onto the snapshot order returned by ``messages``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mailbag.errors import QuotaExceeded, StorageError
from mailbag.wireform import wire_size


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message as the POP3 session sees it.

    ``size`` is the number of octets RETR sends before dot-stuffing: the
    message with every line ending as CRLF and a final CRLF if the stored
    message lacks one (RFC 1939 section 11: sizes are in "exact" octets).
    ``uid`` is 1-70 characters in 0x21-0x7E, unique within the maildrop,
    never reused, and stable across sessions and index loss.
    """

    uid: str
    size: int


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

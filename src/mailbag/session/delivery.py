"""The one delivery code path: recipient lookup, size and quota checks, trace headers, store.

LMTP (``session.lmtp``) and the local delivery agent (``mailbag deliver``)
both call ``DeliveryAgent``, so a message is checked, decorated and stored
the same way whichever door it came in by, and both map outcomes to the
same RFC 3463 codes (the LDA turns them into sysexits on top).

Storage does the atomic part (tmp, fsync, link into ``new/``, fsync the
directory, ``,S=``/``,W=`` in the name); this module decides *whether* to
store.  Quotas are checked here, before anything is written, so a message
that would exceed a quota is refused whole, never truncated.  Deliveries to
one user are serialised inside a process so two parallel LMTP deliveries
cannot both squeeze under the same quota; separate ``mailbag deliver``
processes are not serialised with each other, so the quota can be exceeded
by at most the messages in flight at once (the same trade-off Dovecot
makes with its default quota backend).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailbag.auth.users import UserDatabase, UserRecord, lookup_user
from mailbag.errors import (
    InvalidUsername,
    MailbagError,
    MessageTooLarge,
    PermanentStorageError,
    QuotaExceeded,
    StorageError,
    UnknownUser,
)
from mailbag.logs import log_event
from mailbag.protocol.lmtp import Status
from mailbag.storage.base import Delivery, MultiDelivery, Store
from mailbag.wireform import wire_size


@dataclass(frozen=True, slots=True)
class QuotaDefaults:
    """Limits for users whose users-file line sets none (0 = unlimited)."""

    bytes: int = 0
    messages: int = 0
    #: Answer "over quota" with 452 4.2.2 (MTA retries) instead of 552 5.2.2 (bounce).
    tempfail: bool = False


#: The reply to a copy that hit a bug (never a traceback to the client, DESIGN.md rule 9).
INTERNAL_ERROR = Status(451, "4.3.0", "Temporary failure, try again later")


class Outcome(enum.Enum):
    """What became of one recipient's copy; the LDA maps these to sysexits."""

    DELIVERED = "delivered"
    UNKNOWN_USER = "unknown user"
    TOO_LARGE = "too large"
    OVER_QUOTA = "over quota"
    TEMPORARY = "temporary failure"
    PERMANENT = "permanent failure"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome, the reply for the MTA, and the new UIDL when delivered."""

    outcome: Outcome
    status: Status
    uid: str | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the MTA told us about one copy; ``None`` fields add no header.

    ``sender`` becomes ``Return-Path:`` (``""`` is the null sender ``<>``),
    ``recipient`` becomes ``Delivered-To:`` and the ``for`` clause of
    ``Received:``; ``protocol`` (``LMTP`` or ``None`` for the LDA) and
    ``helo``/``peer`` describe the hop in ``Received:``.
    """

    sender: str | None = None
    recipient: str | None = None
    protocol: str | None = None
    helo: str = ""
    peer: str = ""
    id: str = ""
    received: bool = True


def _clean(text: str) -> str:
    """Make an envelope value safe inside a header: no controls, no line breaks."""
    return "".join(c if c.isprintable() else "?" for c in text)[:998]


def line_ending(message: bytes) -> bytes:
    """The message's own line ending, so added headers match the rest (CRLF or LF)."""
    nl = message.find(b"\n")
    if nl > 0 and message[nl - 1 : nl] == b"\r":
        return b"\r\n"
    return b"\n"


def trace_headers(
    envelope: Envelope, *, hostname: str, eol: bytes, now: float | None = None
) -> bytes:
    """``Return-Path:``, ``Delivered-To:`` and ``Received:`` as LDAs conventionally add them.

    Order top-down as Postfix local and Dovecot LMTP write them: the
    Return-Path of the final delivery first (RFC 5321 section 4.4), then
    Delivered-To (used by MTAs for loop detection), then our Received line.
    """
    lines: list[str] = []
    if envelope.sender is not None:
        lines.append(f"Return-Path: <{_clean(envelope.sender)}>")
    if envelope.recipient is not None:
        lines.append(f"Delivered-To: {_clean(envelope.recipient)}")
    if envelope.received:
        date = email.utils.formatdate(now, localtime=True)
        parts = ["Received:"]
        if envelope.protocol:
            source = _clean(envelope.helo) or "unknown"
            peer = f" ({_clean(envelope.peer)})" if envelope.peer else ""
            parts.append(f"from {source}{peer}")
            parts.append(f"by {hostname} (mailbag) with {envelope.protocol}")
        else:
            parts.append(f"by {hostname} (mailbag deliver)")
        if envelope.id:
            parts.append(f"id {_clean(envelope.id)}")
        if envelope.recipient is not None:
            parts.append(f"for <{_clean(envelope.recipient)}>")
        parts[-1] += ";"
        # Folded with a tab like every MTA's Received line (RFC 5322 section 2.2.3).
        lines.append(parts[0] + " " + f"{eol.decode()}\t".join(parts[1:]) + " " + date)
    return b"".join(line.encode("utf-8") + eol for line in lines)


class DeliveryAgent:
    """Checks and stores a message for its recipients (one transaction where the store can)."""

    def __init__(
        self,
        store: Store,
        users: UserDatabase,
        *,
        hostname: str = "localhost",
        max_message_size: int = 0,
        quota: QuotaDefaults | None = None,
        clock: Callable[[], float] = time.time,
        on_result: Callable[[Outcome], None] | None = None,
    ) -> None:
        #: Told the outcome of every delivery (metrics); must not raise.
        self.on_result = on_result
        self.store = store
        self.users = users
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.quota = quota or QuotaDefaults()
        self._clock = clock
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def lookup(self, address: str) -> UserRecord | None:
        """The account an address names, or None.

        The users file decides (``name`` and ``name@default_domain`` are
        the same account).  Raises ``AuthError`` when the users file itself
        cannot be read: that is a temporary failure, not "no such user".
        """
        try:
            return self.users.lookup(address)
        except InvalidUsername:
            return None

    async def lookup_async(self, address: str) -> UserRecord | None:
        """``lookup`` without blocking the loop when users live in a database."""
        try:
            return await lookup_user(self.users, address)
        except InvalidUsername:
            return None

    def limits(self, record: UserRecord) -> tuple[int, int]:
        """(bytes, messages) limits for ``record``; a per-user value wins, 0 = unlimited."""
        qb = record.quota_bytes if record.quota_bytes is not None else self.quota.bytes
        qm = record.quota_messages if record.quota_messages is not None else self.quota.messages
        return qb, qm

    def _lock(self, user: str) -> asyncio.Lock:
        lock = self._locks.get(user)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[user] = lock
        return lock

    async def deliver_all(
        self, message: bytes, copies: Sequence[tuple[UserRecord, Envelope]]
    ) -> list[DeliveryResult]:
        """Store one message for several accounts; one result per copy, in order.

        With a store that can (``MultiDelivery``) every accepted copy is
        written in one transaction, each recipient's size and quota still
        checked on its own (a full mailbox refuses that recipient alone);
        otherwise the copies are delivered one by one, in parallel.  Never
        raises ``MailbagError``.
        """
        if not isinstance(self.store, MultiDelivery) or len(copies) < 2:
            results = await self._deliver_each(message, copies)
        else:
            results = await self._deliver_together(self.store, message, copies)
        if self.on_result is not None:
            for result in results:
                self.on_result(result.outcome)
        return results

    async def deliver(
        self, record: UserRecord, message: bytes, envelope: Envelope
    ) -> DeliveryResult:
        """Store ``message`` for ``record`` with trace headers; never raises MailbagError."""
        (result,) = await self.deliver_all(message, [(record, envelope)])
        return result

    async def _deliver_each(
        self, message: bytes, copies: Sequence[tuple[UserRecord, Envelope]]
    ) -> list[DeliveryResult]:
        """One delivery per copy, in parallel; a bug hitting one copy spares the others."""
        outcomes = await asyncio.gather(
            *(self._deliver(record, message, envelope) for record, envelope in copies),
            return_exceptions=True,
        )
        results: list[DeliveryResult] = []
        for (record, _), outcome in zip(copies, outcomes, strict=True):
            if isinstance(outcome, DeliveryResult):
                results.append(outcome)
                continue
            if not isinstance(outcome, Exception):
                raise outcome  # cancellation: the session is going away
            log_event("delivery-failed", logging.ERROR, user=record.name, error=repr(outcome))
            results.append(DeliveryResult(Outcome.TEMPORARY, INTERNAL_ERROR))
        return results

    def _too_large(self, message: bytes, who: str) -> DeliveryResult | None:
        if self.max_message_size and len(message) > self.max_message_size:
            return DeliveryResult(
                Outcome.TOO_LARGE,
                Status(552, "5.3.4", f"<{who}> Message too large"),
            )
        return None

    def _decorated(self, message: bytes, envelope: Envelope) -> bytes:
        """The copy to store: this recipient's trace headers, then the message."""
        eol = line_ending(message)
        return trace_headers(envelope, hostname=self.hostname, eol=eol, now=self._clock()) + message

    @staticmethod
    def _delivered(uid: str, who: str) -> DeliveryResult:
        return DeliveryResult(
            Outcome.DELIVERED, Status(250, "2.0.0", f"<{who}> Saved as {uid}"), uid
        )

    def _failed(self, exc: MailbagError, record: UserRecord, who: str) -> DeliveryResult:
        result = self._failure(exc, who)
        log_event("delivery-failed", logging.WARNING, user=record.name,
                  outcome=result.outcome.value, error=str(exc))
        return result

    async def _deliver_together(
        self,
        store: MultiDelivery,
        message: bytes,
        copies: Sequence[tuple[UserRecord, Envelope]],
    ) -> list[DeliveryResult]:
        """One ``deliver_many`` transaction for every copy that passed the size check.

        No per-user lock here: the store checks each quota in the same
        transaction as the write, which serialises deliveries on any node.
        """
        results: list[DeliveryResult | None] = []
        pending: list[tuple[int, UserRecord, str, bytes, int]] = []
        deliveries: list[Delivery] = []
        for record, envelope in copies:
            who = envelope.recipient or record.name
            refusal = self._too_large(message, who)
            results.append(refusal)
            if refusal is None:
                stored = self._decorated(message, envelope)
                max_bytes, max_messages = self.limits(record)
                pending.append((len(results) - 1, record, who, stored, max_bytes))
                deliveries.append(Delivery(record.name, stored, max_bytes, max_messages))
        outcomes: list[str | MailbagError]
        try:
            outcomes = list(await store.deliver_many(deliveries)) if deliveries else []
        except MailbagError as exc:  # the transaction failed: nobody got the message
            outcomes = [exc] * len(deliveries)
        for (i, record, who, stored, max_bytes), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, QuotaExceeded):
                log_event("over-quota", user=record.name, size=wire_size([stored]))
                results[i] = self._over_quota(record, stored, who, max_bytes)
            elif isinstance(outcome, MailbagError):
                results[i] = self._failed(outcome, record, who)
            else:
                results[i] = self._delivered(outcome, who)
        return [r for r in results if r is not None]

    async def _deliver(
        self, record: UserRecord, message: bytes, envelope: Envelope
    ) -> DeliveryResult:
        who = envelope.recipient or record.name
        refusal = self._too_large(message, who)
        if refusal is not None:
            return refusal
        stored = self._decorated(message, envelope)
        lock = self._lock(record.name)
        async with lock:
            try:
                if isinstance(self.store, MultiDelivery):
                    # A shared store checks the quota in the write's own transaction,
                    # so deliveries on other nodes cannot overshoot it together.
                    max_bytes, max_messages = self.limits(record)
                    (outcome,) = await self.store.deliver_many(
                        [Delivery(record.name, stored, max_bytes, max_messages)]
                    )
                    if isinstance(outcome, QuotaExceeded):
                        return self._over_quota(record, stored, who, max_bytes)
                    if isinstance(outcome, StorageError):
                        raise outcome
                    uid = outcome
                else:
                    refusal = await self._check_quota(record, stored, who)
                    if refusal is not None:
                        return refusal
                    uid = await self.store.deliver(record.name, stored)
            except MailbagError as exc:
                return self._failed(exc, record, who)
        return self._delivered(uid, who)

    async def _check_quota(
        self, record: UserRecord, stored: bytes, who: str
    ) -> DeliveryResult | None:
        """Refuse whole if storing would exceed a limit (RFC 3463 X.2.2 mailbox full)."""
        max_bytes, max_messages = self.limits(record)
        if not max_bytes and not max_messages:
            return None
        size = wire_size([stored])
        usage = await self.store.usage(record.name)
        over = (max_messages and usage.messages + 1 > max_messages) or (
            max_bytes and usage.octets + size > max_bytes
        )
        if not over:
            return None
        log_event("over-quota", user=record.name, messages=usage.messages,
                  octets=usage.octets, size=size)
        return self._over_quota(record, stored, who, max_bytes)

    def _over_quota(
        self, record: UserRecord, stored: bytes, who: str, max_bytes: int
    ) -> DeliveryResult:
        """452 or 552 for a refusal by quota (``quota.tempfail``)."""
        size = wire_size([stored])
        # Bigger than the whole quota: waiting cannot help, so never tempfail that.
        if self.quota.tempfail and not (max_bytes and size > max_bytes):
            return DeliveryResult(Outcome.OVER_QUOTA, Status(452, "4.2.2", f"<{who}> Mailbox full"))
        return DeliveryResult(Outcome.OVER_QUOTA, Status(552, "5.2.2", f"<{who}> Mailbox full"))

    def _failure(self, exc: MailbagError, who: str) -> DeliveryResult:
        """Map an exception family to its reply (errors.py documents the mapping)."""
        if isinstance(exc, QuotaExceeded):
            return DeliveryResult(Outcome.OVER_QUOTA, Status(552, "5.2.2", f"<{who}> Mailbox full"))
        if isinstance(exc, MessageTooLarge):
            return DeliveryResult(
                Outcome.TOO_LARGE, Status(552, "5.3.4", f"<{who}> Message too large")
            )
        if isinstance(exc, UnknownUser | InvalidUsername):
            return DeliveryResult(
                Outcome.UNKNOWN_USER, Status(550, "5.1.1", f"<{who}> User unknown")
            )
        if isinstance(exc, PermanentStorageError):
            return DeliveryResult(
                Outcome.PERMANENT, Status(554, "5.3.0", f"<{who}> Cannot store message")
            )
        if isinstance(exc, StorageError):
            return DeliveryResult(
                Outcome.TEMPORARY,
                Status(451, "4.3.0", f"<{who}> Temporary storage failure, try again later"),
            )
        return DeliveryResult(
            Outcome.TEMPORARY, Status(451, "4.3.0", f"<{who}> Temporary failure, try again later")
        )

"""``Store.import_messages`` for PostgreSQL: UIDLs kept exactly, re-runs harmless.

The rules are the contract's (``storage.base``), the same as Maildir's:

* the maildrop's lease is held for the whole call, like a POP3 session's,
  so no session sees a half-imported maildrop and a busy one is refused
  with ``MaildropLocked`` (a dry run takes no lease and writes nothing);
* every source key ever imported is remembered (``imported_keys``), with
  the arrival ``seq`` of the message it became.  A key whose message is
  still there is *present* (not stored again); one whose message was
  deleted since is not brought back;
* every UIDL an import served is reserved (``reserved_uids``), also after
  deletion or a ``replace_uids``, so no later message of the maildrop gets
  it; a UIDL already in use makes the message take mailbag's own;
* messages are written in batches, each in one transaction that first
  proves the lease is still this node's (``LeaseLost`` otherwise) and keeps
  the maildrop's running totals exact.  A run that stops part-way has
  committed whole batches only; the next run finds them present.

The state needed to decide (keys and UIDLs in use) is read once at the
start; nobody else can change it while the lease is held, except deliveries,
whose UIDLs come from fresh unique names and cannot collide.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailbag.database.pool import Connection
from mailbag.storage.base import ImportMessage, ImportOptions, ImportResult
from mailbag.storage.maildir_names import derive_uidl, is_valid_uidl, split_user

if TYPE_CHECKING:
    from mailbag.storage.postgres.store import PostgresStore

#: A batch is written when it holds this many messages or octets, whichever first.
BATCH_MESSAGES = 200
BATCH_OCTETS = 8 * 1024 * 1024


@dataclass(slots=True)
class _Known:
    """A source key imported before (or earlier in this run)."""

    #: The UIDL served now; None when the message was deleted since.
    uid: str | None
    kept: bool
    #: Arrival sequence; None while the message waits in the current batch.
    seq: int | None = None


@dataclass(slots=True)
class _New:
    key: str
    known: _Known
    name: str
    wire: int
    chunks: list[bytes]
    received: float | None


@dataclass(slots=True)
class _Batch:
    new: list[_New] = field(default_factory=list)
    #: (seq, key, new UIDL) of present messages whose UIDL is replaced.
    renames: list[tuple[int, str, str]] = field(default_factory=list)
    octets: int = 0

    def full(self) -> bool:
        return len(self.new) >= BATCH_MESSAGES or self.octets >= BATCH_OCTETS


#: Stores one batch (None in a dry run).
_Writer = Callable[[_Batch], Awaitable[None]]


@dataclass(slots=True)
class _State:
    keys: dict[str, _Known]
    used: set[str]


async def _load(conn: Connection, maildrop_id: int | None) -> _State:
    """Keys imported before and every UIDL in use or reserved in the maildrop."""
    if maildrop_id is None:
        return _State({}, set())
    rows = await conn.fetch(
        """
        SELECT k.key, k.kept, k.seq, m.uid FROM imported_keys k
        LEFT JOIN messages m ON m.maildrop_id = k.maildrop_id AND m.seq = k.seq
        WHERE k.maildrop_id = $1
        """,
        maildrop_id,
    )
    keys = {r["key"]: _Known(r["uid"], bool(r["kept"]), int(r["seq"])) for r in rows}
    used = await conn.fetch(
        "SELECT uid FROM messages WHERE maildrop_id = $1"
        " UNION SELECT uid FROM reserved_uids WHERE maildrop_id = $1",
        maildrop_id,
    )
    return _State(keys, {r["uid"] for r in used})


async def run_import(
    store: PostgresStore,
    user: str,
    messages: AsyncIterable[ImportMessage],
    options: ImportOptions,
) -> ImportResult:
    """Import ``messages`` into ``user``'s maildrop under its lease (see the module doc)."""
    split_user(user)
    if options.dry_run:
        async with store.db.connection("read a maildrop for import") as conn:
            state = await _load(conn, await store.maildrop_id(conn, user, create=False))
        return await _decide(store, messages, options, state, None)
    token: int | None = None
    maildrop_id = 0
    try:
        async with store.db.connection("open a maildrop for import") as conn:
            found = await store.maildrop_id(conn, user, create=True)
            assert found is not None
            maildrop_id = found
            token = await store.leases.acquire(conn, maildrop_id, user)
            state = await _load(conn, maildrop_id)

        async def write(batch: _Batch) -> None:
            assert token is not None
            await _write(store, maildrop_id, token, batch)

        return await _decide(store, messages, options, state, write)
    finally:
        if token is not None:
            await asyncio.shield(store.leases.release(maildrop_id, token, user))


async def _decide(
    store: PostgresStore,
    messages: AsyncIterable[ImportMessage],
    options: ImportOptions,
    state: _State,
    write: _Writer | None,
) -> ImportResult:
    """Walk the source, deciding per message; ``write`` (None: dry run) stores batches."""
    result = ImportResult()
    batch = _Batch()
    deleted_since = 0
    async for message in messages:
        uid = message.uid if message.uid and is_valid_uidl(message.uid) else None
        if message.uid is not None and uid is None:
            result.warnings.append(f"UIDL {message.uid!r} of {message.key} is not valid POP3; "
                                   "mailbag's own UIDL is used")
        known = state.keys.get(message.key)
        if known is not None and known.uid is None:
            deleted_since += 1
            continue
        if known is not None:
            assert known.uid is not None
            result.present += 1
            if uid is not None and uid != known.uid:
                result.conflicts += known.kept
                if (not known.kept or options.replace_uids) and uid not in state.used:
                    state.used.add(uid)
                    _rename(batch, message.key, known, uid)
            result.uids.append(known.uid)
            continue
        if uid is not None and uid in state.used:
            result.warnings.append(f"UIDL {uid!r} of {message.key} is already used by another "
                                   "message; mailbag uses its own")
            uid = None
        result.imported += 1
        if write is None:
            result.uids.append(uid or "?")
            continue
        name, wire, chunks = store.prepare_body(await message.read())
        known = _Known(uid or derive_uidl(name), uid is not None)
        assert known.uid is not None
        state.keys[message.key] = known
        state.used.add(known.uid)
        batch.new.append(_New(message.key, known, name, wire, chunks, message.received))
        batch.octets += sum(map(len, chunks))
        result.uids.append(known.uid)
        if batch.full():
            await write(batch)
            batch = _Batch()
    if write is not None and (batch.new or batch.renames):
        await write(batch)
    if deleted_since:
        result.warnings.append(f"{deleted_since} messages were imported before and deleted "
                               "since: not brought back")
    return result


def _rename(batch: _Batch, key: str, known: _Known, uid: str) -> None:
    """Serve ``uid`` for a present message from now on (``replace_uids`` or a first kept one)."""
    known.uid = uid
    known.kept = True
    if known.seq is not None:
        batch.renames.append((known.seq, key, uid))
    # else: the message is still in this batch and is written with its new UIDL


async def _write(store: PostgresStore, maildrop_id: int, token: int, batch: _Batch) -> None:
    """One transaction: lease still ours, messages and keys in, totals updated."""
    from mailbag.storage.postgres.store import insert_message

    async with store.db.transaction("import messages") as conn:
        await store.leases.check(conn, maildrop_id, token)
        for new in batch.new:
            assert new.known.uid is not None
            new.known.seq = await insert_message(
                conn, maildrop_id, new.name, new.known.uid, new.wire, new.chunks, new.received
            )
        await conn.executemany(
            "INSERT INTO imported_keys (maildrop_id, key, seq, kept) VALUES ($1, $2, $3, $4)",
            [(maildrop_id, n.key, n.known.seq, n.known.kept) for n in batch.new],
        )
        for seq, key, uid in batch.renames:
            await conn.execute(
                "UPDATE messages SET uid = $3 WHERE maildrop_id = $1 AND seq = $2",
                maildrop_id, seq, uid,
            )
            await conn.execute(
                "UPDATE imported_keys SET kept = true WHERE maildrop_id = $1 AND key = $2",
                maildrop_id, key,
            )
        reserved = [n.known.uid for n in batch.new] + [uid for _, _, uid in batch.renames]
        await conn.executemany(
            "INSERT INTO reserved_uids (maildrop_id, uid) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(maildrop_id, uid) for uid in reserved],
        )
        await conn.execute(
            "UPDATE maildrops SET messages = messages + $2, octets = octets + $3,"
            " version = version + 1 WHERE id = $1",
            maildrop_id, len(batch.new), sum(n.wire for n in batch.new),
        )

"""PostgreSQL storage: many stateless nodes sharing one database.

What makes it behave like the Maildir backend, so ``mailbag migrate`` moves
mail either way with UIDLs intact:

* Each delivery gets a Maildir unique name from the same ``NameGenerator``
  and its UIDL is ``derive_uidl(unique_name)``, exactly as a Maildir file
  would have.  Both are stored; a UIDL is never reused (120 bits of hash over
  a name with time, pid, counter and 64 random bits, plus a unique key).
* The wire size is computed once, at delivery, so STAT/LIST/UIDL read one
  small row per message and never a body.
* Bodies are stored in ``CHUNK_SIZE`` rows (see ``maildrop``), so TOP reads
  one row, not the whole message.

Delivery updates the maildrop's running totals in the same transaction as
the insert, with the quota as the update's condition: concurrent deliveries
to one user (from any node) queue on that row and are re-checked after the
wait, so they cannot overshoot the quota together.

Locking is the lease protocol of ``leases``; database failures become
``StorageError`` (``database.pool``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Sequence
from typing import Any

from mailbag.database import schema
from mailbag.database.pool import Connection, Database
from mailbag.errors import ConfigError, MaildropLocked, QuotaExceeded, StorageError
from mailbag.storage.base import (
    Delivery,
    ImportMessage,
    ImportOptions,
    ImportResult,
    Usage,
)
from mailbag.storage.maildir_names import NameGenerator, derive_uidl, split_user
from mailbag.storage.postgres.leases import (
    DEFAULT_LEASE_TIME,
    LISTING,
    LeaseKeeper,
    listing_order,
)
from mailbag.storage.postgres.listings import Listing, ListingCache
from mailbag.storage.postgres.maildrop import CHUNK_SIZE, PostgresMaildrop
from mailbag.wireform import wire_size

log = logging.getLogger(__name__)

#: Pauses (seconds) before an open that found the maildrop locked tries again.
#: Covers a release still on its way from the node (or worker process) where
#: the last session quit: a round trip, or a few under load.  A maildrop
#: really in use is reported 0.4 s later than it could be.
LOCKED_RETRIES = (0.001, 0.005, 0.025, 0.1, 0.25)


async def insert_message(
    conn: Connection,
    maildrop_id: int,
    name: str,
    uid: str,
    wire: int,
    chunks: list[bytes],
    received: float | None = None,
) -> int:
    """Insert one message and its body rows (inside the caller's transaction); its ``seq``.

    The caller updates the maildrop's running totals in the same transaction.
    """
    seq = await conn.fetchval(
        """
        INSERT INTO messages
            (maildrop_id, unique_name, uid, stored_size, wire_size, chunks, delivered_at)
        VALUES ($1, $2, $3, $4, $5, $6, coalesce(to_timestamp($7::float8), now()))
        RETURNING seq
        """,
        maildrop_id,
        name,
        uid,
        sum(map(len, chunks)),
        wire,
        len(chunks),
        received,
    )
    await conn.execute(
        """
        INSERT INTO message_chunks (maildrop_id, seq, n, data)
        SELECT $1, $2, n - 1, data FROM unnest($3::bytea[]) WITH ORDINALITY AS c(data, n)
        """,
        maildrop_id,
        seq,
        chunks,
    )
    return int(seq)


class PostgresStore:
    """Maildrops in PostgreSQL, locked by leases, reached through a small pool.

    ``dsn`` names the database (several hosts allowed, see
    ``database.pool``); ``node_name`` prefixes this process's lease owner id
    (default: the host name).  ``database`` lets the composition root share
    one pool with the users backend.
    """

    def __init__(
        self,
        dsn: str = "",
        *,
        database: Database | None = None,
        pool_min_size: int = 2,
        pool_max_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        lease_time: float = DEFAULT_LEASE_TIME,
        node_id: str | None = None,
        hostname: str | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if database is None:
            if not dsn:
                raise ConfigError("the postgres storage backend needs a dsn ([database] dsn)")
            database = Database(
                dsn,
                min_size=pool_min_size,
                max_size=pool_max_size,
                connect_timeout=connect_timeout,
                command_timeout=command_timeout,
            )
        if chunk_size < 1024:
            raise ValueError(f"chunk_size must be at least 1024 octets, not {chunk_size}")
        self.db = database
        self.leases = LeaseKeeper(database, node_id=node_id, lease_time=lease_time)
        #: Message lists of earlier sessions, reused while their version holds.
        self.listings = ListingCache()
        self._names = NameGenerator(hostname)
        self._chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"PostgresStore(node={self.leases.node_id!r})"

    @property
    def node_id(self) -> str:
        """This process's identity as a lease owner."""
        return self.leases.node_id

    # -- lifecycle -----------------------------------------------------------

    async def check_schema(self) -> None:
        """Refuse to serve with a schema that is behind or ahead (``SchemaMismatch``)."""
        await schema.require_current(self.db)

    async def close(self) -> None:
        """Send queued releases, stop the heartbeat, close the pool (open leases then expire)."""
        await self.leases.flush()
        await self.leases.stop()
        await self.db.close()

    # -- SelfCheck (``mailbag check``, start-up, ``/healthz``) --------------------

    def prepare(self) -> None:
        """Nothing to create: the schema is applied by ``mailbag db init`` (checked at serve)."""

    def check(self) -> str:
        """The line ``mailbag check`` prints (the schema is reported under ``database:``)."""
        return f"storage: postgres (lease time {self.leases.lease_time:g} s)"

    def problems(self) -> list[str]:
        """Unhealthy when leases are held and the heartbeat has not reached the database.

        Cheap (no query: ``/healthz`` runs in the metrics thread): after a
        lease time without a renewal, this node's sessions are about to lose
        their locks and cannot commit a QUIT.
        """
        leases = self.leases
        if leases.holding and time.monotonic() - leases.last_renewal > leases.lease_time:
            return ["database unreachable: maildrop lease heartbeat failing"]
        return []

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    async def maildrop_id(conn: Connection, user: str, *, create: bool) -> int | None:
        """The maildrop's row id, created on first use when ``create`` (else None if none)."""
        found = await conn.fetchval("SELECT id FROM maildrops WHERE name = $1", user)
        if found is not None or not create:
            return None if found is None else int(found)
        await conn.execute(
            "INSERT INTO maildrops (name) VALUES ($1) ON CONFLICT (name) DO NOTHING", user
        )
        return int(await conn.fetchval("SELECT id FROM maildrops WHERE name = $1", user))

    # -- Store interface -------------------------------------------------------

    async def open_maildrop(self, user: str) -> PostgresMaildrop:
        """Take the lease and snapshot the message list (no body is read).

        A maildrop found locked is tried again after ``LOCKED_RETRIES``
        pauses before ``MaildropLocked`` is raised: a session that just
        quit on another node may not have released its lease yet (releases
        are queued, see ``LeaseKeeper.release_soon``).
        """
        split_user(user)
        for pause in LOCKED_RETRIES:
            try:
                return await self._open(user)
            except MaildropLocked:
                await asyncio.sleep(pause)
        return await self._open(user)

    async def _open(self, user: str) -> PostgresMaildrop:
        """One attempt: if anything fails after the lease was taken, it is released."""
        token: int | None = None
        maildrop_id = 0
        try:
            kept = self.listings.latest(user)
            if kept is not None:  # opened here before: a share of one small statement, usually
                known = await self.leases.acquire_known(kept.maildrop_id, user)
                if known is not None:
                    maildrop_id = kept.maildrop_id
                    token, version, fresh = known
                    listing = self.listings.get(user, maildrop_id, version) if fresh else None
                    if listing is None:
                        async with self.db.connection("list maildrop") as conn:
                            listing = await self._list(conn, user, maildrop_id)
                    return PostgresMaildrop(self.db, self.leases, user, token, listing)
            async with self.db.connection("open maildrop") as conn:
                # One round trip for a maildrop first opened by another node; three
                # for a new one.
                opened = await self.leases.acquire_listing(conn, user)
                if opened is None:
                    found = await self.maildrop_id(conn, user, create=True)
                    assert found is not None
                    maildrop_id = found
                    token = await self.leases.acquire(conn, maildrop_id, user)
                    listing = await self._list(conn, user, maildrop_id)
                else:
                    maildrop_id, token, version, row = opened
                    if row is None:  # the snapshot may be older than the lease
                        listing = await self._list(conn, user, maildrop_id)
                    else:
                        listing = self._keep(user, maildrop_id, version, row)
        except BaseException:
            if token is not None:
                self.leases.release_soon(maildrop_id, token, user)
            raise
        return PostgresMaildrop(self.db, self.leases, user, token, listing)

    async def _list(self, conn: Connection, user: str, maildrop_id: int) -> Listing:
        """Read the list (and its version) in a statement of its own."""
        row = await conn.fetchrow(
            f"""SELECT d.version, m.* FROM maildrops d,
                LATERAL ({LISTING.format(maildrop="d.id")}) AS m WHERE d.id = $1""",
            maildrop_id,
        )
        return self._keep(user, maildrop_id, int(row["version"]), row)

    def _keep(self, user: str, maildrop_id: int, version: int, row: Any) -> Listing:
        listing = Listing.build(maildrop_id, version, *listing_order(row))
        self.listings.put(user, listing)
        return listing

    async def deliver(self, user: str, message: bytes) -> str:
        """Store one message in one transaction; return its UIDL."""
        (result,) = await self.deliver_many([Delivery(user, bytes(message))])
        if isinstance(result, StorageError):
            raise result
        return result

    async def deliver_many(self, deliveries: Sequence[Delivery]) -> list[str | StorageError]:
        """Deliver to every recipient in one transaction (``MultiDelivery``).

        A recipient over quota gets ``QuotaExceeded`` and nothing is written
        for it; the others commit together.  Maildrop rows are touched in
        name order so two multi-recipient deliveries cannot deadlock.
        """
        for d in deliveries:
            split_user(d.user)
        prepared = [(d, self.prepare_body(d.message)) for d in deliveries]
        results: dict[int, str | StorageError] = {}
        order = sorted(range(len(prepared)), key=lambda i: prepared[i][0].user)
        async with self.db.transaction("deliver") as conn:
            for i in order:
                d, (name, wire, chunks) = prepared[i]
                results[i] = await self._insert(conn, d, name, wire, chunks)
        return [results[i] for i in range(len(prepared))]

    def prepare_body(self, message: bytes) -> tuple[str, int, list[bytes]]:
        """A new unique name, the wire size and the body rows of ``message``."""
        wire = wire_size([message])
        name = self._names.make(len(message), wire)
        size = self._chunk_size
        chunks = [message[i : i + size] for i in range(0, len(message), size)] or [b""]
        return name, wire, chunks

    async def _insert(
        self, conn: Connection, d: Delivery, name: str, wire: int, chunks: list[bytes]
    ) -> str | StorageError:
        maildrop_id = await self.maildrop_id(conn, d.user, create=True)
        accepted = await conn.fetchval(
            """
            UPDATE maildrops SET messages = messages + 1, octets = octets + $2,
                                 version = version + 1
            WHERE id = $1
              AND ($3 = 0 OR octets + $2 <= $3)
              AND ($4 = 0 OR messages + 1 <= $4)
            RETURNING id
            """,
            maildrop_id,
            wire,
            d.max_octets,
            d.max_messages,
        )
        if accepted is None:
            return QuotaExceeded(f"{d.user}: delivery of {wire} octets would exceed the quota")
        uid = derive_uidl(name)
        await insert_message(conn, int(accepted), name, uid, wire, chunks)
        return uid

    async def usage(self, user: str) -> Usage:
        """The running totals: one row, never a scan of the messages."""
        split_user(user)
        async with self.db.connection("measure maildrop") as conn:
            row = await conn.fetchrow(
                "SELECT messages, octets FROM maildrops WHERE name = $1", user
            )
        return Usage(0, 0) if row is None else Usage(int(row["messages"]), int(row["octets"]))


    async def import_messages(
        self,
        user: str,
        messages: AsyncIterable[ImportMessage],
        options: ImportOptions | None = None,
    ) -> ImportResult:
        """Bring messages in keeping their UIDLs (``Store.import_messages``; see ``importer``)."""
        from mailbag.storage.postgres.importer import run_import

        return await run_import(self, user, messages, options or ImportOptions())

"""An open PostgreSQL maildrop: a snapshot, chunked reads, one-transaction QUIT.

The session holds no database connection between commands: the snapshot
is taken at open, every read borrows a connection for one query, and the
QUIT deletes borrow one for one transaction.  A session idling for ten
minutes costs the database nothing but its lease row.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from mailbag.database.pool import Database
from mailbag.errors import MessageGone, StorageError
from mailbag.storage.base import DeleteResult, MessageInfo
from mailbag.storage.postgres.leases import LeaseKeeper
from mailbag.storage.postgres.listings import Listing, Stored

log = logging.getLogger(__name__)

#: Octets per body row.  Small enough that TOP reads little (the first row
#: holds the header of nearly every message), big enough that RETR of a
#: large message needs few rows.
CHUNK_SIZE = 64 * 1024

#: Rows per query after the first: a 1 MiB message in three round trips,
#: with at most this many rows of one message in memory per session.
BATCH_ROWS = 8

#: Read-ahead of small messages: when a session reads messages in order (what
#: every fetching client does: RETR 1, RETR 2, ...), the next single-row
#: messages come with the one asked for, up to this many octets and messages
#: per query, so a maildrop of small messages costs a round trip per batch
#: rather than per message.  Also the bound on what a session keeps in memory.
READ_AHEAD_OCTETS = 128 * 1024
READ_AHEAD_MESSAGES = 32


def _release_forgotten(leases: LeaseKeeper, maildrop_id: int, token: int, user: str) -> None:
    """A maildrop was garbage-collected without ``close``: release its lease soon.

    Otherwise the node's heartbeat would keep alive a lease that no
    session will ever release, locking the user out until a restart.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop, so no heartbeat either: the lease expires by itself
    leases.release_soon(maildrop_id, token, user)


class PostgresMaildrop:
    """One leased maildrop with its message list fixed at open."""

    def __init__(
        self,
        db: Database,
        leases: LeaseKeeper,
        user: str,
        token: int,
        listing: Listing,
    ) -> None:
        self._db = db
        self._leases = leases
        self._user = user
        self._id = maildrop_id = listing.maildrop_id
        self._token = token
        #: Shared with other sessions through the node's ``ListingCache``: read only.
        self._stored = listing.stored
        self._messages = listing.messages
        self._deleted: set[str] = set()
        self._closed = False
        #: Bodies read ahead (uid -> stored bytes), and the position a read in
        #: order would ask for next (the first read counts as in order).
        self._ahead: dict[str, bytes] = {}
        self._next_position = 0
        self._finalizer = weakref.finalize(
            self, _release_forgotten, leases, maildrop_id, token, user
        )

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open, in arrival order."""
        return self._messages

    def _find(self, uid: str) -> Stored:
        if self._closed:
            raise StorageError(f"maildrop of {self._user!r} is closed")
        found = self._stored.get(uid)
        if found is None or uid in self._deleted:
            raise MessageGone(f"no message {uid} in the maildrop of {self._user!r}")
        return found

    async def read(self, uid: str, *, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """Yield the stored bytes; the first query fetches one row, later ones a batch.

        A connection is held only while a query runs, never while the
        client is being sent what it returned, so a slow reader cannot
        starve the pool.  TOP stops iterating after the header and the
        first lines, so it costs one row.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        stored = self._find(uid)
        if stored.chunks == 1:
            body = await self._single_row(uid, stored)
            if len(body) <= chunk_size:
                if body:
                    yield body
            else:
                for start in range(0, len(body), chunk_size):
                    yield body[start : start + chunk_size]
            # Reached only when the reader took the whole message (TOP stops early).
            self._next_position = stored.position + 1
            return
        first, batch = 0, 1
        while first < stored.chunks:
            last = min(first + batch, stored.chunks)
            async with self._db.connection("read message") as conn:
                rows = await conn.fetch(
                    "SELECT data FROM message_chunks"
                    " WHERE maildrop_id = $1 AND seq = $2 AND n >= $3 AND n < $4 ORDER BY n",
                    self._id,
                    stored.seq,
                    first,
                    last,
                )
            if len(rows) != last - first:
                raise MessageGone(f"message {uid} of {self._user!r} vanished")
            for row in rows:
                data: bytes = row["data"]
                if len(data) <= chunk_size:
                    if data:
                        yield data
                    continue
                view = memoryview(data)
                for start in range(0, len(data), chunk_size):
                    yield bytes(view[start : start + chunk_size])
            first, batch = last, BATCH_ROWS
        self._next_position = stored.position + 1

    async def read_whole(self, uid: str, limit: int) -> bytes | None:
        """``WholeReader``: a single-row message in one call (read ahead when in order)."""
        stored = self._find(uid)
        if stored.chunks != 1 or stored.wire_size > limit:  # stored octets <= wire size
            return None
        body = await self._single_row(uid, stored)
        self._next_position = stored.position + 1
        return body

    async def _single_row(self, uid: str, stored: Stored) -> bytes:
        """A single-row message: read ahead already, or read now (with read-ahead if in order)."""
        body = self._ahead.pop(uid, None)
        if body is not None:
            return body
        return await self._read_ahead(uid, stored, more=stored.position == self._next_position)

    async def _read_ahead(self, uid: str, stored: Stored, *, more: bool) -> bytes:
        """The single-row message ``uid``; with ``more``, the small ones after it into ``_ahead``.

        Only messages still in the snapshot (not marked deleted) are read
        ahead, and ``_ahead`` is replaced, not grown, so a session never
        holds more than ``READ_AHEAD_OCTETS`` of bodies it did not ask for.
        """
        wanted = {stored.seq: uid}
        octets = stored.wire_size
        messages = self._messages  # the snapshot in order: ``position`` indexes it
        for position in range(stored.position + 1, len(messages) if more else 0):
            if len(wanted) >= READ_AHEAD_MESSAGES:
                break
            following = messages[position].uid
            info = self._stored[following]
            if info.chunks != 1 or following in self._deleted:
                continue
            octets += info.wire_size
            if octets > READ_AHEAD_OCTETS:
                break
            wanted[info.seq] = following
        async with self._db.connection("read messages") as conn:
            rows = await conn.fetch(
                "SELECT seq, data FROM message_chunks"
                " WHERE maildrop_id = $1 AND seq = ANY($2::bigint[]) AND n = 0",
                self._id,
                list(wanted),
            )
        found = {int(row["seq"]): row["data"] for row in rows}
        data = found.pop(stored.seq, None)
        if data is None:
            raise MessageGone(f"message {uid} of {self._user!r} vanished")
        self._ahead = {wanted[seq]: body for seq, body in found.items()}
        return bytes(data)

    async def delete(self, uids: Sequence[str]) -> DeleteResult:
        """Delete in one transaction that first proves the lease is still ours.

        If the lease expired (the heartbeat could not reach the database in
        time) or another node took it over, ``LeaseLost`` is raised and
        nothing is deleted: the client sees ``-ERR [SYS/TEMP]`` and its
        messages stay for the next session.
        """
        if self._closed:
            raise StorageError(f"maildrop of {self._user!r} is closed")
        failed = [uid for uid in uids if uid not in self._stored]
        wanted = [uid for uid in uids if uid in self._stored and uid not in self._deleted]
        seqs = [self._stored[uid].seq for uid in wanted]
        async with self._db.transaction("delete messages") as conn:
            await self._leases.check(conn, self._id, self._token)
            if seqs:
                # One statement, not a DELETE then an UPDATE: the totals follow what
                # was actually deleted (a row already gone is not subtracted twice).
                await conn.execute(
                    """
                    WITH gone AS (
                        DELETE FROM messages WHERE maildrop_id = $1 AND seq = ANY($2::bigint[])
                        RETURNING wire_size
                    )
                    UPDATE maildrops AS d
                    SET messages = d.messages - g.n, octets = d.octets - g.octets,
                        version = d.version + 1
                    FROM (SELECT count(*) AS n, coalesce(sum(wire_size), 0)::bigint AS octets
                          FROM gone) AS g
                    WHERE d.id = $1
                    """,
                    self._id,
                    seqs,
                )
        self._deleted.update(wanted)
        deleted = sum(1 for uid in uids if uid in self._stored)
        return DeleteResult(deleted, tuple(failed))

    async def close(self) -> None:
        """Release the lease (queued, see ``LeaseKeeper.release_soon``); safe to call twice.

        Returns without a round trip: the QUIT's ``+OK`` does not wait for
        the database.  It yields to the loop once, so that the release
        statement (when none is in flight) is written before the caller
        answers the client: a client reconnecting at once through another
        node then finds the maildrop free, not locked for one round trip.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._leases.release_soon(self._id, self._token, self._user)
        await asyncio.sleep(0)

    async def __aenter__(self) -> PostgresMaildrop:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

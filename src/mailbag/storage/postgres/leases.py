"""The RFC 1939 maildrop lock across nodes: leases that die with their node.

A POP3 session holds its maildrop for minutes while the client idles, so the
lock cannot be a database connection (or a transaction, or a session-level
advisory lock): that would cost a connection per session.  Instead each
open maildrop has one row in ``leases`` naming the node process and a
session token, with an expiry in *database* time.

* **One heartbeat per node**, not per session: every ``lease_time / 3``
  seconds one ``UPDATE leases SET expires_at = ... WHERE node = $1`` renews
  every lease the node holds, however many sessions it serves.
* **A dead node frees its locks within ``lease_time``**: killed with -9 or
  cut off from the database, it stops renewing, and after the bound any node
  may take the row over (the acquire is an upsert that only replaces an
  expired row).
* **A node past its bound can never commit**: the heartbeat renews only
  leases that are still alive, so an expired lease stays dead; and the QUIT
  transaction locks the lease row, checks owner, token and expiry against
  ``clock_timestamp()``, and deletes in the same transaction.  A takeover
  has to update that row too, so it waits for the commit, or the commit
  sees the takeover and refuses.
* **Node identity is per process**: ``{name}/{pid}/{random}``.  A node that
  restarts under the same name cannot adopt (and keep alive forever) the
  leases of the process that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from typing import Any

from mailbag.database.pool import Connection, Database, describe
from mailbag.errors import MaildropLocked, StorageError

log = logging.getLogger(__name__)

#: The upsert's conflict clause: replace a lease row only once it has expired
#: (database time), so a live lease of any node keeps the maildrop locked.
TAKE_LEASE = """ON CONFLICT (maildrop_id) DO UPDATE
                SET node = EXCLUDED.node, token = EXCLUDED.token,
                    acquired_at = now(), expires_at = EXCLUDED.expires_at
                WHERE l.expires_at < clock_timestamp()"""

#: A maildrop's message list as one row of arrays: ``seqs``, ``uids``, ``sizes``
#: (wire sizes) and ``chunks`` (body rows); NULLs when it is empty.  Aggregated
#: from a subquery sorted by ``seq``, which in practice gives arrival order; an
#: ``ORDER BY`` in each aggregate would sort four times (measured 2x slower at
#: 100,000 messages).  The order is not guaranteed by SQL, so ``listing_order``
#: checks it and sorts if needed.
LISTING = """SELECT array_agg(seq) AS seqs, array_agg(uid) AS uids,
                array_agg(wire_size) AS sizes, array_agg(chunks) AS chunks
         FROM (SELECT seq, uid, wire_size, chunks FROM messages
               WHERE maildrop_id = {maildrop} ORDER BY seq) AS listed"""


def listing_order(row: Any) -> tuple[list[int], list[str], list[int], list[int]]:
    """A ``LISTING`` row's four lists, in arrival order (empty for an empty maildrop)."""
    seqs: list[int] = row["seqs"] or []
    uids: list[str] = row["uids"] or []
    sizes: list[int] = row["sizes"] or []
    chunks: list[int] = row["chunks"] or []
    if seqs != sorted(seqs):  # timsort of a sorted list: one linear pass
        order = sorted(range(len(seqs)), key=seqs.__getitem__)
        seqs = [seqs[i] for i in order]
        uids = [uids[i] for i in order]
        sizes = [sizes[i] for i in order]
        chunks = [chunks[i] for i in order]
    return seqs, uids, sizes, chunks


#: RFC-style upper bound from issue 13: a dead node's locks are free within 30 s.
DEFAULT_LEASE_TIME = 30.0


def make_node_id(name: str = "") -> str:
    """A cluster-unique id for this process: the name, pid and 48 random bits."""
    base = name or socket.gethostname() or "node"
    return f"{base}/{os.getpid()}/{os.urandom(6).hex()}"


class LeaseLost(StorageError):
    """This node no longer holds the maildrop's lease: the QUIT must not commit."""


class LeaseKeeper:
    """Acquires, renews (all at once) and releases this node's leases."""

    def __init__(
        self, db: Database, *, node_id: str | None = None, lease_time: float = DEFAULT_LEASE_TIME
    ) -> None:
        if lease_time < 1.0:
            raise ValueError(f"lease_time must be at least 1 second, not {lease_time}")
        self.db = db
        self.node_id = node_id or make_node_id()
        self.lease_time = lease_time
        self.interval = lease_time / 3
        self._tokens = itertools.count(1)
        #: Tokens of the leases this node's sessions hold; only these are renewed,
        #: so a lease whose release failed (database down) is left to expire.
        self._held: set[int] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopped = False
        #: ``time.monotonic()`` of the last renewal that reached the database.
        self.last_renewal = 0.0
        #: Releases waiting for the next DELETE, and the task sending them.
        self._releasing: list[tuple[int, int, asyncio.Future[None]]] = []
        self._releaser: asyncio.Task[None] | None = None

    @property
    def holding(self) -> bool:
        """Whether any session of this node holds a lease (the heartbeat has work)."""
        return bool(self._held)

    # -- acquire / release ------------------------------------------------------

    async def acquire(self, conn: Connection, maildrop_id: int, user: str) -> int:
        """Take the lease for this maildrop; return the session's token.

        Raises ``MaildropLocked`` when a live lease of any node (this one
        included) exists.
        """
        token = next(self._tokens)
        row = await conn.fetchrow(
            f"""
            INSERT INTO leases AS l (maildrop_id, node, token, expires_at)
            VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))
            {TAKE_LEASE}
            RETURNING token
            """,
            maildrop_id,
            self.node_id,
            token,
            self.lease_time,
        )
        if row is None:
            raise MaildropLocked(f"maildrop of {user!r} is in use")
        self.taken(token)
        return token

    async def acquire_listing(self, conn: Connection, user: str) -> tuple[int, int, Any] | None:
        """Find the maildrop, take its lease and list its messages in one round trip.

        The login path of every session, so one statement instead of three
        (find, lease, list).  The list is read in the statement's snapshot.
        When the lease row was free (the usual case: a release deletes it)
        that snapshot is as good as a later one, since nobody could change
        the maildrop's messages without the lease.  When an *expired* lease
        was taken over, its dead holder's QUIT may have committed while this
        statement waited for the row, after the snapshot: then the list is
        ``None`` and the caller reads it again in a new statement.

        The list comes as one row of four arrays in arrival order (``LISTING``),
        not a row per message: asyncpg decodes an array into a list in C, so a
        100,000-message maildrop costs four lists instead of 100,000 records.

        Returns ``(maildrop id, token, listing row or None)``, or None when
        the maildrop does not exist yet (the caller creates it and takes the
        slow path).  Raises ``MaildropLocked`` as ``acquire`` does.
        """
        token = next(self._tokens)
        row = await conn.fetchrow(
            f"""
            WITH drop AS (SELECT id FROM maildrops WHERE name = $1),
            lease AS (
                INSERT INTO leases AS l (maildrop_id, node, token, expires_at)
                SELECT id, $2, $3, clock_timestamp() + make_interval(secs => $4) FROM drop
                {TAKE_LEASE}
                RETURNING maildrop_id, (xmax = 0) AS fresh
            )
            SELECT drop.id AS maildrop_id, lease.fresh, m.*
            FROM drop LEFT JOIN lease ON true
            LEFT JOIN LATERAL ({LISTING.format(maildrop="lease.maildrop_id")}) AS m ON true
            """,
            user,
            self.node_id,
            token,
            self.lease_time,
        )
        if row is None:
            return None
        if row["fresh"] is None:
            raise MaildropLocked(f"maildrop of {user!r} is in use")
        self.taken(token)
        return int(row["maildrop_id"]), token, row if row["fresh"] else None

    def taken(self, token: int) -> None:
        """Account for a lease just taken: the heartbeat renews it from now on."""
        if not self._held:  # the heartbeat's clock starts with its first lease
            self.last_renewal = time.monotonic()
        self._held.add(token)
        self._ensure_heartbeat()

    async def release(self, maildrop_id: int, token: int) -> None:
        """Drop the lease; if the database is unreachable it is no longer renewed, so it expires.

        Returns once the row is deleted (a QUIT answers after this, so a client
        reconnecting at once finds its maildrop free).  Releases that arrive
        while one ``DELETE`` is in flight go together in the next one: under
        load a node sends one statement for many sessions' releases, and an
        idle node sends each at once, as before.
        """
        self._held.discard(token)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        releaser = self._releaser
        if releaser is not None and releaser.get_loop() is not loop:
            self._releasing, releaser = [], None  # a loop that is gone (tests): start over
        self._releasing.append((maildrop_id, token, done))
        if releaser is None or releaser.done():
            self._releaser = loop.create_task(self._release_batches())
        await done

    async def _release_batches(self) -> None:
        while self._releasing:
            batch, self._releasing = self._releasing, []
            try:
                async with self.db.connection("release maildrop leases") as conn:
                    await conn.execute(
                        "DELETE FROM leases WHERE node = $1 AND token = ANY($2::bigint[])",
                        self.node_id,
                        [token for _, token, _ in batch],
                    )
            except StorageError as exc:
                log.warning("cannot release leases on maildrops %s (they expire): %s",
                            ", ".join(str(m) for m, _, _ in batch), exc)
            except BaseException:
                for _, _, done in batch:  # cancelled with the loop: nobody waits any more
                    if not done.done():
                        done.cancel()
                raise
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def check(self, conn: Connection, maildrop_id: int, token: int) -> None:
        """Inside the QUIT transaction: lock our lease row and make sure it is still ours.

        ``FOR UPDATE`` serialises this commit with any takeover of the row,
        and ``clock_timestamp()`` is the database's time now, not at the
        start of the transaction.
        """
        alive = await conn.fetchval(
            """
            SELECT expires_at > clock_timestamp() FROM leases
            WHERE maildrop_id = $1 AND node = $2 AND token = $3
            FOR UPDATE
            """,
            maildrop_id,
            self.node_id,
            token,
        )
        if not alive:
            raise LeaseLost(
                f"lease on maildrop {maildrop_id} expired or was taken over; nothing committed"
            )

    # -- heartbeat ---------------------------------------------------------------

    def _ensure_heartbeat(self) -> None:
        task = self._heartbeat
        loop = asyncio.get_running_loop()
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._stopped = False
        self._heartbeat = loop.create_task(self._beat(), name=f"lease-heartbeat {self.node_id}")

    async def renew(self) -> int:
        """Renew every live lease of this node with one UPDATE; return how many."""
        if not self._held:
            self.last_renewal = time.monotonic()
            return 0
        async with self.db.connection("renew maildrop leases") as conn:
            status = await conn.execute(
                """
                UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $2)
                WHERE node = $1 AND token = ANY($3::bigint[]) AND expires_at > clock_timestamp()
                """,
                self.node_id,
                self.lease_time,
                list(self._held),
            )
        self.last_renewal = time.monotonic()
        return int(status.rsplit(" ", 1)[-1])

    async def _beat(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.interval)
            if self._stopped:
                return
            try:
                await self.renew()
            except StorageError as exc:
                log.warning("lease heartbeat failed (leases expire in <= %.0f s): %s",
                            self.lease_time, describe(exc))
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the heartbeat die silently
                log.exception("lease heartbeat crashed; retrying")

    async def stop(self) -> None:
        """Stop renewing (at shutdown, or in tests to simulate a dead node)."""
        self._stopped = True
        task, self._heartbeat = self._heartbeat, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

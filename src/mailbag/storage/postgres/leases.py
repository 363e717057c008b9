"""The RFC 1939 maildrop lock across nodes: leases that die with their node.

A POP3 session holds its maildrop for minutes while the client idles, so the
lock cannot be a database connection (or a transaction, or a session-level
advisory lock): that would cost a connection per session.  Instead each
maildrop has one row in ``leases`` naming the node process and session token
that hold it, with an expiry in *database* time (``'-infinity'`` once
released).  The row is created at the maildrop's first open and from then on
taken and released by updates in place: no insert, delete, dead row or index
entry per session (schema version 5).

* **One heartbeat per node**, not per session: every ``lease_time / 3``
  seconds one ``UPDATE leases SET expires_at = ...`` renews every lease the
  node holds, however many sessions it serves.
* **A dead node frees its locks within ``lease_time``**: killed with -9 or
  cut off from the database, it stops renewing, and after the bound any node
  may take the row over (an open only takes a released or expired row).
* **Releases are queued, not waited for**: a QUIT answers at once, the
  releases of a few milliseconds go to the database in one statement, an
  open on the same node takes its own queued lease over directly, and an
  open on another node that finds the maildrop locked retries briefly.
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

#: When a lease row may be taken: it was released ('-infinity') or has expired
#: (database time), or it is this node's own lease whose release is queued
#: (``{mine}``, 0 for none; tokens start at 1).  A live lease of any node, this
#: one included, keeps the maildrop locked.
FREE_AS = "(l.expires_at < clock_timestamp() OR (l.node = $2 AND l.token = {mine}))"

#: The same test as it stood in an open's snapshot, where expired does not
#: count: the list read in that snapshot is exact only if nobody could change
#: the messages, i.e. the lease was released or was this node's own.
WAS_FREE_AS = "(l.expires_at = '-infinity' OR (l.node = $2 AND l.token = {mine}))"

#: What taking a lease writes (node ``$2``, token ``{token}``, lease time ``$4``),
#: however it is taken; ``generation`` counts the takings.
TAKE_AS = """node = $2, token = {token}, acquired_at = now(),
          expires_at = clock_timestamp() + make_interval(secs => $4),
          generation = l.generation + 1"""

#: The fragments for one open: token ``$3``, own queued token ``$5``.
FREE = FREE_AS.format(mine="$5")
WAS_FREE = WAS_FREE_AS.format(mine="$5")
TAKE = TAKE_AS.format(token="$3")

#: The upsert's conflict clause (a maildrop's first open inserts its row).
TAKE_LEASE = f"ON CONFLICT (maildrop_id) DO UPDATE SET {TAKE} WHERE {FREE}"

#: SQLSTATE of a transaction PostgreSQL aborted to break a deadlock.
DEADLOCK = "40P01"

#: Most opens one ``acquire_known`` statement takes at once.
OPEN_BATCH = 64


def _open_sql(*, batch: bool) -> str:
    """``acquire_known``'s statement: take free leases by id, say which and how fresh.

    ``$1`` the maildrop ids, ``$3`` the tokens (in a batch, the one of the row
    at hand), ``$5`` this node's own queued tokens; a batch also carries the
    releases queued with it (``$6`` ids, ``$7`` tokens).  A round of one is
    sent with scalars: PostgreSQL plans a statement with array parameters
    afresh at each execution (its generic plan looks dearer than a plan for
    the actual array), about 0.1 ms of backend CPU, while the scalar
    statement keeps its generic plan (``pg_prepared_statements.custom_plans``,
    measured).  Rows are found through the primary key whatever the plan
    (the version by a scalar subquery, not a join that could scan
    ``maildrops``).
    """
    if batch:
        ids, mine = "ANY($1::bigint[])", "ANY($5::bigint[])"
        token = "($3::bigint[])[array_position($1::bigint[], l.maildrop_id)]"
        released = f"""released AS ({_release_sql("ANY($6::bigint[])", "ANY($7::bigint[])")}),
        """
    else:
        ids, token, mine, released = "$1", "$3", "$5", ""
    return f"""
        WITH {released}drop AS (
            SELECT l.maildrop_id, l.generation AS seen,
                   (SELECT m.version FROM maildrops m WHERE m.id = l.maildrop_id) AS version,
                   {WAS_FREE_AS.format(mine=mine)} AS was_free
            FROM leases l WHERE l.maildrop_id = {ids}
        ),
        lease AS (
            UPDATE leases AS l SET {TAKE_AS.format(token=token)}
            WHERE l.maildrop_id = {ids} AND {FREE_AS.format(mine=mine)}
            RETURNING l.maildrop_id, l.generation
        )
        SELECT d.maildrop_id, d.version, lease.generation IS NOT NULL AS taken,
               (d.was_free AND lease.generation = d.seen + 1) AS fresh
        FROM drop d LEFT JOIN lease USING (maildrop_id)
        """


def _release_sql(ids: str, tokens: str) -> str:
    """Release leases of this node (node ``$2``).

    The released rows are never rows the same statement takes (``_rounds``).
    """
    return f"""UPDATE leases SET expires_at = '-infinity'
               WHERE maildrop_id = {ids} AND node = $2 AND token = {tokens}"""


OPEN_ONE, OPEN_MANY = _open_sql(batch=False), _open_sql(batch=True)
RELEASE_ONE = _release_sql("$1", "$3")
RELEASE_MANY = _release_sql("ANY($1::bigint[])", "ANY($3::bigint[])")

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


class _Release:
    """One queued release: which row, whose token, and who waits for it."""

    __slots__ = ("done", "maildrop_id", "sent", "token")

    def __init__(self, maildrop_id: int, token: int, done: asyncio.Future[None]) -> None:
        self.maildrop_id = maildrop_id
        self.token = token
        self.done = done
        self.sent = False

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Open:
    """One queued ``acquire_known``: which row, the token it will hold, who waits."""

    __slots__ = ("done", "maildrop_id", "token", "user")

    def __init__(self, maildrop_id: int, user: str, token: int,
                 done: asyncio.Future[tuple[int, int, bool] | None]) -> None:
        self.maildrop_id = maildrop_id
        self.user = user
        self.token = token
        self.done = done


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
        #: The leases this node's sessions hold (token -> maildrop id); only these
        #: are renewed, so a lease whose release failed (database down) expires.
        self._held: dict[int, int] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopped = False
        #: ``time.monotonic()`` of the last renewal that reached the database.
        self.last_renewal = 0.0
        #: Releases not yet confirmed by the database, by maildrop name: the
        #: token and maildrop id, and a future done once the row is released.
        #: An open of that name on this node takes the lease over directly.
        self._releasing: dict[str, _Release] = {}
        #: Opens of known maildrops waiting for the next round (``acquire_known``).
        self._opening: list[_Open] = []
        #: Sends the queued opens and releases, one statement per round.
        self._sender: asyncio.Task[None] | None = None
        #: Whether the sender's round in flight carries releases and no opens.
        self._only_releases = False
        #: Rounds of logins sent beside a round of releases (``_send_soon``).
        self._side_rounds: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def holding(self) -> bool:
        """Whether any session of this node holds a lease (the heartbeat has work)."""
        return bool(self._held)

    # -- acquire / release ------------------------------------------------------

    def _adopt_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; releases queued under an earlier loop (tests) move to it.

        A loop that ended with releases queued cancelled their sending; they
        are sent again from this loop (an UPDATE that finds the lease already
        released or taken over changes nothing).
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, earlier = loop, self._releasing
            self._releasing = {key: _Release(p.maildrop_id, p.token, loop.create_future())
                               for key, p in earlier.items()}
            # Opens queued under the ended loop have nobody waiting any more.
            self._opening, self._sender, self._only_releases = [], None, False
            if earlier:
                self._send_soon(loop)
        return loop

    def _send_soon(self, loop: asyncio.AbstractEventLoop, *, opening: bool = False) -> None:
        """Make sure a round leaves: now if none is in flight, else after the current one.

        A login (``opening``) does not queue behind a round of releases only:
        it leaves at once in a round of its own, as a login did before
        releases and opens shared rounds.  (The QUIT of the previous session
        of the same user is then usually that round in flight, and the open
        waits for its row in the database, not for a round trip more.)
        """
        sender = self._sender
        if sender is None or sender.done():
            self._sender = loop.create_task(self._rounds())
        elif opening and self._only_releases:
            side = loop.create_task(self._round(self._next_opens(), []))
            self._side_rounds.add(side)  # a reference, so the task is not collected
            side.add_done_callback(self._side_rounds.discard)

    def _own_pending(self, user: str) -> int:
        """The token of this node's not yet confirmed release of ``user``'s maildrop, or 0."""
        self._adopt_loop()
        pending = self._releasing.get(user)
        return pending.token if pending is not None else 0

    async def acquire(self, conn: Connection, maildrop_id: int, user: str) -> int:
        """Take the lease for this maildrop; return the session's token.

        Creates the maildrop's lease row on its first open (the upsert's
        insert); afterwards the row is updated in place.  Raises
        ``MaildropLocked`` when a live lease of any node exists (this node's
        own lease counts too, unless its release is already under way).
        """
        token = next(self._tokens)
        mine = self._own_pending(user)
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
            mine,
        )
        if row is None:
            raise MaildropLocked(f"maildrop of {user!r} is in use")
        self.taken(token, maildrop_id, user, mine)
        return token

    async def acquire_listing(
        self, conn: Connection, user: str
    ) -> tuple[int, int, int, Any] | None:
        """Find the maildrop, take its lease and list its messages in one round trip.

        The login path of every session, so one statement instead of three
        (find, lease, list).  The lease row is updated in place (``UPDATE``,
        no insert or delete per session).  The list is read in the
        statement's snapshot.  That snapshot is exact when, in it, the lease
        was free (released, or this node's own lease whose release is under
        way) *and* nobody took the lease between the snapshot and the update
        (``generation`` went up by exactly one): nobody could have changed the
        maildrop's messages without the lease.  Otherwise (an expired lease
        taken over, whose dead holder's QUIT may have committed while this
        statement waited for the row; or a race with another open) the list
        is ``None`` and the caller reads it again in a new statement.

        A maildrop whose list this node kept is opened with ``acquire_known``
        instead; this is the first open on this node.

        The list comes as one row of four arrays in arrival order (``LISTING``),
        not a row per message: asyncpg decodes an array into a list in C, so a
        100,000-message maildrop costs four lists instead of 100,000 records.

        Returns ``(maildrop id, token, version, row or None)``, or None when
        the maildrop or its lease row does not exist yet (the caller creates
        them with ``acquire`` and reads the list itself).  Raises
        ``MaildropLocked`` as ``acquire`` does.
        """
        token = next(self._tokens)
        mine = self._own_pending(user)
        row = await conn.fetchrow(
            f"""
            WITH drop AS (
                SELECT m.id, m.version, l.generation AS seen,
                       l.maildrop_id IS NOT NULL AS has_lease, {WAS_FREE} AS was_free
                FROM maildrops m LEFT JOIN leases l ON l.maildrop_id = m.id
                WHERE m.name = $1
            ),
            lease AS (
                UPDATE leases AS l SET {TAKE}
                FROM drop
                WHERE l.maildrop_id = drop.id AND {FREE}
                RETURNING l.maildrop_id, l.generation
            )
            SELECT drop.id AS maildrop_id, drop.version, drop.has_lease,
                   lease.maildrop_id IS NOT NULL AS taken,
                   (drop.was_free AND lease.generation = drop.seen + 1) AS fresh, m.*
            FROM drop LEFT JOIN lease ON true
            LEFT JOIN LATERAL ({LISTING.format(maildrop="lease.maildrop_id")}) AS m ON true
            """,
            user,
            self.node_id,
            token,
            self.lease_time,
            mine,
        )
        if row is None or not row["has_lease"]:
            return None
        if not row["taken"]:
            raise MaildropLocked(f"maildrop of {user!r} is in use")
        maildrop_id = int(row["maildrop_id"])
        self.taken(token, maildrop_id, user, mine)
        return maildrop_id, token, int(row["version"]), row if row["fresh"] else None

    async def acquire_known(self, maildrop_id: int, user: str) -> tuple[int, int, bool] | None:
        """Take the lease of a maildrop this node has opened before, by id, without its list.

        The login of a maildrop whose list the node kept (``listings``): the
        smallest statement that takes the lease (no lookup by name, no list
        in the plan), shared by all the opens and releases that queue while
        the previous one is in flight (``_rounds``), so under load the
        database sees one statement for many logins and QUITs.  At c=1 the
        statement leaves at once, as a lone open would.

        Returns ``(token, version, fresh)``, where ``version`` is the
        maildrop's version in the statement's snapshot and ``fresh`` says
        whether that snapshot is exact (as in ``acquire_listing``): the kept
        list may be used only when both hold.  Returns None when the lease
        row does not exist (the caller takes the slow path), and raises
        ``MaildropLocked`` as ``acquire`` does.  A caller cancelled while
        its open is in flight leaves nothing held: a lease taken for it is
        released.
        """
        loop = self._adopt_loop()
        request = _Open(maildrop_id, user, next(self._tokens), loop.create_future())
        self._opening.append(request)
        self._send_soon(loop, opening=True)
        try:
            return await request.done
        except asyncio.CancelledError:
            done = request.done
            if done.done() and not done.cancelled() and done.exception() is None:
                taken = done.result()  # answered, but cancelled before it could use it
                if taken is not None:
                    self.release_soon(maildrop_id, taken[0], user)
            raise

    async def _rounds(self) -> None:
        """Send the queued opens and releases, one statement per round, until none is left.

        No pause before the first round: with an idle pooled connection, the
        statement is written to the socket in this task's first step.

        A maildrop is taken at most once per statement (its row is updated
        once, whatever the number of requests for it); a second open of it
        waits for the next round, where it finds the maildrop locked.  A
        release of a maildrop that an open of the round takes is left out:
        the open takes the lease over (its token counts as free), and the
        release is dropped (``taken``).  A row is waited for only when it was
        free in the snapshot and somebody is changing it: a row held by a
        live lease is passed over without a wait.  Two nodes' rounds lock
        their rows in the order of the same scan, so they should not
        deadlock; if PostgreSQL still picks a round as a deadlock's victim,
        it is sent again.
        """
        while True:
            opens = self._next_opens()
            taking = {r.maildrop_id for r in opens}
            releases = [p for p in self._releasing.values()
                        if not p.sent and p.maildrop_id not in taking]
            if not opens and not releases:
                return
            self._only_releases = not opens
            try:
                await self._round(opens, releases)
            finally:
                self._only_releases = False

    async def _round(self, opens: list[_Open], releases: list[_Release]) -> None:
        """Send one round's statement and settle its opens and releases."""
        for pending in releases:
            pending.sent = True
        mine = [self._own_pending(r.user) for r in opens]
        try:
            async with self.db.connection("lease maildrops") as conn:
                rows = await self._send(conn, opens, mine, releases)
        except Exception as exc:
            if getattr(exc.__cause__, "sqlstate", None) == DEADLOCK:
                self._opening[:0] = opens  # chosen as the victim: send them again
                for pending in releases:
                    pending.sent = False
                self._send_soon(asyncio.get_running_loop())
                return
            if releases:
                log.warning("cannot release leases on maildrops %s (they expire): %s",
                            ", ".join(str(p.maildrop_id) for p in releases), exc)
            self._fail(opens, exc)
        except BaseException:  # cancelled with its loop: the next loop sends the releases
            for request in opens:
                request.done.cancel()
            for pending in releases:
                pending.sent = False
            raise
        else:
            found = {int(row["maildrop_id"]): row for row in rows}
            for request, replaced in zip(opens, mine, strict=True):
                self._answer(request, found.get(request.maildrop_id), replaced)
        self._forget(releases)

    def _next_opens(self) -> list[_Open]:
        """The opens of the next round: each maildrop once, at most ``OPEN_BATCH``."""
        batch: list[_Open] = []
        later: list[_Open] = []
        ids: set[int] = set()
        for request in self._opening:
            if request.done.done():  # cancelled before it was sent
                continue
            if request.maildrop_id in ids or len(batch) >= OPEN_BATCH:
                later.append(request)
            else:
                ids.add(request.maildrop_id)
                batch.append(request)
        self._opening = later
        return batch

    async def _send(self, conn: Connection, opens: list[_Open], mine: list[int],
                    releases: list[_Release]) -> list[Any]:
        """One round's statement; the rows of its opens.

        Rounds of one are sent with scalars (see ``_open_sql``), the others with
        arrays.
        """
        node = self.node_id
        if not opens:
            if len(releases) == 1:
                await conn.execute(RELEASE_ONE, releases[0].maildrop_id, node, releases[0].token)
            else:
                await conn.execute(RELEASE_MANY, [p.maildrop_id for p in releases], node,
                                   [p.token for p in releases])
            return []
        if len(opens) == 1 and not releases:
            request = opens[0]
            return list(await conn.fetch(OPEN_ONE, request.maildrop_id, node, request.token,
                                         self.lease_time, mine[0]))
        return list(await conn.fetch(
            OPEN_MANY, [r.maildrop_id for r in opens], node, [r.token for r in opens],
            self.lease_time, mine, [p.maildrop_id for p in releases], [p.token for p in releases]))

    @staticmethod
    def _fail(batch: list[_Open], exc: Exception) -> None:
        for request in batch:
            if not request.done.done():
                request.done.set_exception(exc)

    def _answer(self, request: _Open, row: Any, replaced: int) -> None:
        """Settle one open of a batch from its row (None: the lease row does not exist)."""
        if row is not None and row["taken"]:
            self.taken(request.token, request.maildrop_id, request.user, replaced)
            if request.done.done():  # its session went away meanwhile
                self.release_soon(request.maildrop_id, request.token, request.user)
            else:
                request.done.set_result((request.token, int(row["version"]), bool(row["fresh"])))
        elif request.done.done():
            return
        elif row is None:
            request.done.set_result(None)
        else:
            request.done.set_exception(MaildropLocked(f"maildrop of {request.user!r} is in use"))

    def taken(self, token: int, maildrop_id: int, user: str = "", replaced: int = 0) -> None:
        """Account for a lease just taken: the heartbeat renews it from now on.

        ``replaced`` is this node's own earlier token the lease was taken over
        from (its pending release is dropped: the row is no longer its).
        """
        if not self._held:  # the heartbeat's clock starts with its first lease
            self.last_renewal = time.monotonic()
        self._held[token] = maildrop_id
        if replaced:
            pending = self._releasing.get(user)
            if pending is not None and pending.token == replaced and not pending.sent:
                del self._releasing[user]
                pending.finish()
        self._ensure_heartbeat()

    def release_soon(self, maildrop_id: int, token: int, user: str = "") -> asyncio.Future[None]:
        """Queue the lease's release; the future is done once the database has it.

        Nobody needs to wait for it: the lock ends for this node at once (an
        open of ``user`` here takes the lease over directly), and another
        node that finds the maildrop locked retries shortly (``PostgresStore``).
        When no release is in flight, this one's statement is on its way as
        soon as the caller yields once to the loop (``PostgresMaildrop.close``
        does, so the release leaves before QUIT's ``+OK``).  Releases that
        arrive while a round is in flight go together in the next round's
        statement, with the opens queued meanwhile (``_rounds``), so under
        load a node sends one statement for many sessions.  If the
        database is unreachable the lease is no longer renewed, so it expires.
        """
        self._held.pop(token, None)
        loop = self._adopt_loop()
        key = user or f"#{maildrop_id}"
        pending = _Release(maildrop_id, token, loop.create_future())
        earlier = self._releasing.pop(key, None)
        if earlier is not None:  # the previous session's release is still on its way
            self._releasing[f"{key}#{earlier.token}"] = earlier
        self._releasing[key] = pending
        self._send_soon(loop)
        return pending.done

    async def release(self, maildrop_id: int, token: int, user: str = "") -> None:
        """Release and wait until the database has it (imports, tests)."""
        await self.release_soon(maildrop_id, token, user)

    async def flush(self) -> None:
        """Wait until every queued release has reached the database (shutdown, tests)."""
        self._adopt_loop()
        waiting = [p.done for p in self._releasing.values()]
        if waiting:
            await asyncio.gather(*waiting, return_exceptions=True)

    def _forget(self, batch: list[_Release]) -> None:
        if not batch:  # a round of opens only: nothing to rebuild
            return
        done = {id(p) for p in batch}
        self._releasing = {k: p for k, p in self._releasing.items() if id(p) not in done}
        for pending in batch:
            pending.finish()

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
                WHERE maildrop_id = ANY($4::bigint[]) AND node = $1 AND token = ANY($3::bigint[])
                  AND expires_at > clock_timestamp()
                """,
                self.node_id,
                self.lease_time,
                list(self._held),
                list(self._held.values()),
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

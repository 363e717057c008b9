"""The login defence's state in PostgreSQL: one view for every node.

With several nodes behind a load balancer, counters kept in each node's
memory would let an attacker multiply his guesses by spreading them over the
nodes, and a user's known-good networks would be known only to the node that
saw the login.  These implement the two Protocols of
``session.defence_state`` on the shared database (schema version 3), so the
delay policy (``session.throttle``) is unchanged: one round trip per
question, expiry by database time, expired rows deleted now and then by the
writes themselves (no maintenance job).

A database error never breaks a login, and never switches the defence off:
failures are then counted in this node's memory (``MemoryFailureCounters``,
what a single node uses anyway) and those counts still apply, within their
window, once the database answers again.  That matters because the users
need not be in the database: with ``storage.backend = "postgres"`` and a
users file, passwords are still checked during an outage, so answering "no
failures" would hand a guesser an undefended node.  Known-good networks
answer "not known" meanwhile (the stricter answer).  Each failure is logged
once, then again only after the database recovered.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from mailbag.database.pool import Database
from mailbag.errors import MailbagError
from mailbag.logs import log_event
from mailbag.session.defence_state import MemoryFailureCounters

#: One write in this many also deletes expired rows.
CLEANUP_EVERY = 200
#: A key this node read as zero this recently needs no DELETE to reset it.
ZERO_FRESH = 10.0
#: Keys this node read as zero this recently are not read again.  What that can
#: give a guesser: this node's own failures forget the memo at once, and a
#: non-zero count is never remembered, so a failure counted on *another* node
#: goes unseen here for at most this long, and only until this node's first
#: failure on that key: at most one undelayed guess per node, not a rate.
READ_FRESH = 2.0
#: A known-good network this node saw or wrote this recently is not asked again or rewritten.
KNOWN_FRESH = 60.0
#: Entries of the per-node memos above (bounded; the oldest go first).
MEMO_SIZE = 50_000


class _Memo:
    """Keys with the time this node last confirmed something about them (bounded LRU)."""

    def __init__(self, fresh: float, clock: Callable[[], float]) -> None:
        self.fresh = fresh
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def note(self, key: str) -> None:
        self._seen[key] = self._clock()
        self._seen.move_to_end(key)
        while len(self._seen) > MEMO_SIZE:
            self._seen.popitem(last=False)

    def recent(self, key: str, fresh: float | None = None) -> bool:
        seen = self._seen.get(key)
        limit = self.fresh if fresh is None else fresh
        return seen is not None and self._clock() - seen < limit

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)


class _Quiet:
    """Logs a database failure once, then again only after it recovered."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def failed(self, exc: MailbagError) -> None:
        if not self.failing:
            self.failing = True
            log_event("defence-db-failed", logging.WARNING, state=self.what, error=str(exc))

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            log_event("defence-db-recovered", state=self.what)


class PostgresFailureCounters:
    """``FailureCounters`` in the ``auth_failures`` table.

    A successful login resets its source's counter, which nearly always is
    zero already: a key this node has just read as zero is not deleted again
    (at worst a failure counted meanwhile by another node stays, which only
    ever delays, never helps, a guesser).  Keys read as zero in the last
    ``READ_FRESH`` seconds are not read again: a client polling in a loop,
    or many users behind one address, costs no query per login.

    ``_local`` holds what was counted while the database failed; it is empty
    (and costs nothing) otherwise, and its counts are merged (the larger
    wins) into the database's until they expire.
    """

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._health = _Quiet("failure counters")
        self._zero = _Memo(ZERO_FRESH, clock)
        self._local = MemoryFailureCounters(clock=clock)

    async def _merged(self, keys: Sequence[str], window: float, shared: list[int]) -> list[int]:
        if not len(self._local):
            return shared
        local = await self._local.counts(keys, window)
        return [max(a, b) for a, b in zip(shared, local, strict=True)]

    async def counts(self, keys: Sequence[str], window: float) -> list[int]:
        if all(self._zero.recent(key, READ_FRESH) for key in keys):
            return await self._merged(keys, window, [0] * len(keys))  # see READ_FRESH
        try:
            async with self._db.connection("read login failures") as conn:
                rows = await conn.fetch(
                    "SELECT key, failures FROM auth_failures WHERE key = ANY($1::text[])"
                    " AND last_at > now() - make_interval(secs => $2)",
                    list(keys), window,
                )
        except MailbagError as exc:
            self._health.failed(exc)
            return await self._local.counts(keys, window)
        self._health.ok()
        found = {row["key"]: int(row["failures"]) for row in rows}
        for key in keys:
            if key in found:
                self._zero.forget(key)
            else:
                self._zero.note(key)
        return await self._merged(keys, window, [found.get(key, 0) for key in keys])

    async def add(self, keys: Sequence[str], window: float) -> list[int]:
        try:
            async with self._db.connection("count a login failure") as conn:
                rows = await conn.fetch(
                    "INSERT INTO auth_failures AS f (key, failures, last_at)"
                    " SELECT k, 1, now() FROM unnest($1::text[]) AS k"
                    " ON CONFLICT (key) DO UPDATE SET"
                    " failures = CASE WHEN f.last_at > now() - make_interval(secs => $2)"
                    " THEN f.failures + 1 ELSE 1 END, last_at = now()"
                    " RETURNING key, failures",
                    list(keys), window,
                )
                if random.randrange(CLEANUP_EVERY) == 0:
                    await conn.execute(
                        "DELETE FROM auth_failures"
                        " WHERE last_at < now() - make_interval(secs => $1)", window,
                    )
        except MailbagError as exc:
            self._health.failed(exc)
            return await self._local.add(keys, window)
        self._health.ok()
        for key in keys:
            self._zero.forget(key)
        found = {row["key"]: int(row["failures"]) for row in rows}
        return await self._merged(keys, window, [found.get(key, 1) for key in keys])

    async def reset(self, key: str) -> None:
        await self._local.reset(key)
        if self._zero.recent(key):
            return
        try:
            async with self._db.connection("reset login failures") as conn:
                await conn.execute("DELETE FROM auth_failures WHERE key = $1", key)
        except MailbagError as exc:
            self._health.failed(exc)
            return
        self._health.ok()


class PostgresKnownNetworks:
    """``KnownNetworks`` in the ``known_networks`` table.

    A network this node saw known (or wrote) in the last ``KNOWN_FRESH``
    seconds is answered from memory and not rewritten: a polling client then
    costs no query here.  Only "known" is remembered, never "unknown", so a
    network another node has just learnt is found at the next question.
    """

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._health = _Quiet("known-good networks")
        self._known = _Memo(KNOWN_FRESH, clock)

    async def is_known(self, account: str, network: str, ttl: float) -> bool:
        if ttl > KNOWN_FRESH and self._known.recent(f"{account}|{network}"):
            return True
        try:
            async with self._db.connection("read known networks") as conn:
                found = await conn.fetchval(
                    "SELECT true FROM known_networks WHERE account = $1 AND network = $2"
                    " AND last_seen > now() - make_interval(secs => $3)",
                    account, network, ttl,
                )
        except MailbagError as exc:
            self._health.failed(exc)
            return False
        self._health.ok()
        if found:
            self._known.note(f"{account}|{network}")
        return bool(found)

    async def remember(self, account: str, network: str, ttl: float) -> None:
        memo = f"{account}|{network}"
        if self._known.recent(memo):
            return  # written (or seen) moments ago; last_seen is fine to the minute
        try:
            async with self._db.connection("remember a known network") as conn:
                await conn.execute(
                    "INSERT INTO known_networks (account, network, last_seen)"
                    " VALUES ($1, $2, now()) ON CONFLICT (account, network)"
                    " DO UPDATE SET last_seen = now()",
                    account, network,
                )
                if random.randrange(CLEANUP_EVERY) == 0:
                    await conn.execute(
                        "DELETE FROM known_networks"
                        " WHERE last_seen < now() - make_interval(secs => $1)", ttl,
                    )
        except MailbagError as exc:
            self._health.failed(exc)
            return
        self._health.ok()
        self._known.note(memo)

    async def close(self) -> None:
        """Nothing is pending: every change is written when it happens."""

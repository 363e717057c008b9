"""Tell a node's caches when a table changed: one ``LISTEN`` connection per process.

A cache of database rows on a node is only allowed if a change made anywhere
(another node, ``mailbag user passwd`` on an admin's laptop, plain SQL) is
seen at once.  A trigger (schema version 4) sends ``NOTIFY`` on every change
of the table, PostgreSQL delivers it when the writing transaction commits,
and ``ChangeFeed`` receives it on a connection of its own (outside the pool:
a listening connection cannot be shared) and bumps ``generation``.

The rules a cache follows (``GenerationCache`` implements them):

* use entries only while the feed is ``live`` (listening, and its connection
  answered a ping in the last ``PING_EVERY`` seconds);
* store a looked-up row only if ``generation`` did not move between the
  start of the query and its answer (a change may have raced with it);
* forget everything when ``generation`` moves; changes are rare (users
  change passwords, admins add users), so per-key invalidation would buy
  nothing but code;
* never keep an entry longer than ``MAX_AGE``, a bound on staleness even if
  a notice were lost in a way the ping cannot see.

When the connection drops, the feed is not live (caches answer nothing from
memory) and it reconnects by itself with a growing pause; a multi-host DSN
finds the new primary as the pool does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import asyncpg

from mailbag.database.pool import DRIVER_FAILURES, Database, describe

log = logging.getLogger(__name__)

#: Seconds between pings of the listening connection (a silent network loss
#: shows up here, not through the socket).
PING_EVERY = 5.0
#: Longest life of a cache entry, whatever the feed says.
MAX_AGE = 60.0
#: Pauses between reconnection attempts grow up to this.
MAX_RETRY = 30.0

K = TypeVar("K")
V = TypeVar("V")


class ChangeFeed:
    """``LISTEN channel`` on a private connection; counts the notices."""

    def __init__(self, db: Database, channel: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.channel = channel
        self._clock = clock
        #: Moves on every notice and whenever listening starts or stops.
        self.generation = 0
        self._conn: Any = None
        self._last_ok = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Event | None = None
        self._closed = False

    @property
    def live(self) -> bool:
        """Listening now, on a connection that answered recently."""
        return (self._conn is not None and not self._conn.is_closed()
                and self._clock() - self._last_ok < PING_EVERY * 2)

    def start(self) -> None:
        """Start listening in the background (idempotent; needs a running loop)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if self._closed or (task is not None and not task.done() and task.get_loop() is loop):
            return
        self._task = loop.create_task(self._run(), name=f"listen {self.channel}")

    def _notice(self, *_: object) -> None:
        self.generation += 1

    def _drop(self, *_: object) -> None:
        self.generation += 1
        if self._lost is not None:
            self._lost.set()

    async def _run(self) -> None:
        pause = 1.0
        while not self._closed:
            self._lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(
                    self.db.dsn, timeout=self.db.connect_timeout,
                    server_settings={"application_name": f"{self.db.application_name}-listen"},
                )
                conn.add_termination_listener(self._drop)
                await conn.add_listener(self.channel, self._notice)
                self._conn, self._last_ok = conn, self._clock()
                self.generation += 1  # queries that started before this never store
                if pause > 1.0:
                    log.info("listening for %s changes again", self.channel)
                pause = 1.0
                while not self._lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._lost.wait(), PING_EVERY)
                    if self._lost.is_set():
                        break
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), PING_EVERY)
                    self._last_ok = self._clock()
            except asyncio.CancelledError:
                raise
            except DRIVER_FAILURES as exc:
                if pause == 1.0:
                    log.warning("cannot listen for %s changes (caches off until it can): %s",
                                self.channel, describe(exc))
            except Exception:  # never die silently; the caches stay off meanwhile
                log.exception("listening for %s changes failed; retrying", self.channel)
            finally:
                await self._forget()
            if self._closed:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RETRY)

    async def _forget(self) -> None:
        conn, self._conn = self._conn, None
        self.generation += 1
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    async def close(self) -> None:
        """Stop listening (shutdown)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._forget()


class GenerationCache(Generic[K, V]):
    """A bounded LRU of rows, trusted only while its ``ChangeFeed`` is live.

    Use: ``hit = cache.get(key)``; on a miss, ``token = cache.token()``
    before the query and ``cache.put(key, value, token)`` after it.
    """

    _MISS: Any = object()

    def __init__(self, feed: ChangeFeed, size: int = 10_000, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.feed = feed
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._generation = -1

    def _valid(self) -> bool:
        if not self.feed.live:
            self._entries.clear()
            return False
        if self.feed.generation != self._generation:
            self._entries.clear()
            self._generation = self.feed.generation
        return True

    def get(self, key: K) -> tuple[bool, V | None]:
        """``(True, value)`` for a usable entry, else ``(False, None)``."""
        if not self._valid():
            return False, None
        found = self._entries.get(key)
        if found is None or self._clock() - found[1] > MAX_AGE:
            return False, None
        self._entries.move_to_end(key)
        return True, found[0]

    def token(self) -> int | None:
        """Call before the query; None when nothing may be stored."""
        self.feed.start()
        return self.feed.generation if self._valid() else None

    def put(self, key: K, value: V, token: int | None) -> None:
        """Store what the query started at ``token`` found, if nothing changed since."""
        if token is None or not self._valid() or self.feed.generation != token:
            return
        self._entries[key] = (value, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

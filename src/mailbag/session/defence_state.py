"""Where the login defence keeps its state: failure counters and known-good networks.

Two small interfaces, so the state can live elsewhere without touching the
policy (``session.throttle``): in this process (``MemoryFailureCounters``,
``session.known_good.KnownNetworksFile``, the embedded default), shared by
worker processes, or in PostgreSQL shared by every node, so an attacker gains
nothing by spreading guesses over workers or nodes.  The methods are
coroutines because those other homes are a round trip away; the timing
parameters (window, TTL) are passed in on every call because they are policy
(a SIGHUP may change them) while the state outlives a reload.

Keys are opaque strings chosen by the policy (``addr:…``, ``acct:…``,
``pair:…``); a store never interprets them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

#: Counters kept in memory; the least recently failed are forgotten first.
MAX_TRACKED = 100_000


class FailureCounters(Protocol):
    """Recent authentication failures per key, forgotten ``window`` seconds after the last."""

    async def counts(self, keys: Sequence[str], window: float) -> list[int]:
        """Current failure count of each key (0 when unknown or expired)."""
        ...

    async def add(self, keys: Sequence[str], window: float) -> list[int]:
        """Count one failure on each key; the new counts."""
        ...

    async def reset(self, key: str) -> None:
        """Forget one key (a success clears its source's counter)."""
        ...


class KnownNetworks(Protocol):
    """Per account, the networks it logged in from successfully, each with a last-seen time."""

    async def is_known(self, account: str, network: str, ttl: float) -> bool:
        """Did ``account`` log in successfully from ``network`` within the last ``ttl`` seconds?"""
        ...

    async def remember(self, account: str, network: str, ttl: float) -> None:
        """Record a successful login (``ttl``: entries older than this may be dropped)."""
        ...

    async def close(self) -> None:
        """Persist what is pending; called once at shutdown."""
        ...


@dataclass(slots=True)
class _Counter:
    failures: int
    last: float


class MemoryFailureCounters:
    """``FailureCounters`` in this process's memory, bounded to ``max_tracked`` keys."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_tracked: int = MAX_TRACKED
    ) -> None:
        self._clock = clock
        self.max_tracked = max_tracked
        self._table: OrderedDict[str, _Counter] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def _current(self, key: str, window: float, now: float) -> _Counter | None:
        counter = self._table.get(key)
        if counter is not None and now - counter.last > window:
            del self._table[key]
            return None
        return counter

    async def counts(self, keys: Sequence[str], window: float) -> list[int]:
        now = self._clock()
        result = []
        for key in keys:
            counter = self._current(key, window, now)
            result.append(0 if counter is None else counter.failures)
        return result

    async def add(self, keys: Sequence[str], window: float) -> list[int]:
        now = self._clock()
        result = []
        for key in keys:
            counter = self._current(key, window, now) or _Counter(0, now)
            counter.failures += 1
            counter.last = now
            self._table[key] = counter
            self._table.move_to_end(key)
            result.append(counter.failures)
        while len(self._table) > self.max_tracked:
            self._table.popitem(last=False)
        return result

    async def reset(self, key: str) -> None:
        self._table.pop(key, None)

"""Guessing defence: failure counters per address and per account, with growing delay.

Nothing is ever locked: a failure only makes the *next* attempts from that
address, or for that account, wait a little longer before they are checked
(doubling from ``base`` up to ``cap``), and the counters forget after
``window`` seconds.  An attacker guessing in parallel from one address is
slowed down exponentially; the legitimate user typing from elsewhere waits at
most ``cap`` seconds, once, and never gets locked out.  The delays are
``asyncio.sleep`` calls, so other sessions are not blocked.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: Entries kept per table; the oldest are forgotten first, so memory is bounded.
MAX_TRACKED = 100_000


@dataclass(slots=True)
class _Counter:
    failures: int
    last: float


class FailureThrottle:
    """Counts recent authentication failures and computes the delay to apply."""

    def __init__(
        self,
        *,
        base: float = 2.0,
        cap: float = 15.0,
        window: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.cap = cap
        self.window = window
        self._clock = clock
        self._by_address: OrderedDict[str, _Counter] = OrderedDict()
        self._by_account: OrderedDict[str, _Counter] = OrderedDict()

    def _failures(self, table: OrderedDict[str, _Counter], key: str) -> int:
        counter = table.get(key)
        if counter is None:
            return 0
        if self._clock() - counter.last > self.window:
            del table[key]
            return 0
        return counter.failures

    def delay_before_check(self, address: str, account: str) -> float:
        """Seconds to wait before checking credentials, given recent failures."""
        failures = max(
            self._failures(self._by_address, address),
            self._failures(self._by_account, account.lower()),
        )
        if failures == 0:
            return 0.0
        return min(self.cap, self.base * float(2 ** min(failures - 1, 16)) / 2)

    def failure_delay(self) -> float:
        """Seconds before a failure is answered (identical for unknown users)."""
        return self.base

    def record_failure(self, address: str, account: str) -> int:
        """Count one failure; returns the address's failure count."""
        now = self._clock()
        result = 0
        for table, key in ((self._by_address, address), (self._by_account, account.lower())):
            counter = table.get(key)
            if counter is None or now - counter.last > self.window:
                counter = _Counter(0, now)
            counter.failures += 1
            counter.last = now
            table[key] = counter
            table.move_to_end(key)
            while len(table) > MAX_TRACKED:
                table.popitem(last=False)
            if table is self._by_address:
                result = counter.failures
        return result

    def record_success(self, address: str, account: str) -> None:
        """A correct password clears the account's counter (not the address's)."""
        self._by_account.pop(account.lower(), None)

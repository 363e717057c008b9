"""Connection caps (in total and per client address) that hold across worker processes.

A listener asks its gate before it starts a session: ``admit(address, total,
per_address)`` counts the connection and says yes, or says no without
counting; ``release(address)`` when the session ends.  ``LocalGate`` counts in
a dict (one process).  ``SharedGate`` counts in a shared-memory table that
every worker maps, so a client that lands on N workers still gets the cap
once, not N times, and no connection costs a round trip to another process.

The shared table (``SharedCounts``) has one row per worker slot, and a worker
writes only its own row: its session total and, for each address, two
counters chosen by two keyed hashes of the address.  An address's count is
the smaller of its two column sums over all rows (a count-min sketch): it can
only over-count, when another address collides on *both* counters, so a cap
is never exceeded; with 65,536 columns per hash a false refusal needs a
double collision next to a client that is already at its cap.  The hash key
is random per supervisor, so nobody can aim for a collision.

Check-and-count runs under an ``fcntl`` record lock on the table's file, so
two workers admitting the same address at once cannot both take the last
place; the kernel drops the lock of a process that dies holding it.  When a
worker dies, the supervisor zeroes its row (``clear_row``), which frees every
place that worker held: its connections died with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
from collections import Counter
from typing import Protocol

#: Columns per hash; two hashes, 16-bit counters: 256 KiB per worker row.
COLUMNS = 65536
#: Largest per-address count a column holds (a higher per-address cap is treated as this).
COLUMN_MAX = 0xFFFF
_MAGIC = b"mbgate01"
_HEADER = struct.Struct("<8sII16s")  # magic, rows, columns, hash key
_ROW_HEAD = 8  # u32 total + u32 padding, keeps the counters aligned


class ConnectionGate(Protocol):
    """What a listener asks before it starts a session."""

    def admit(self, address: str, total: int, per_address: int) -> bool:
        """Count one connection from ``address`` unless a cap is reached; False: refuse it."""

    def release(self, address: str) -> None:
        """A connection admitted earlier ended."""

    def total(self) -> int:
        """Connections counted now (over every worker, for a shared gate)."""


class LocalGate:
    """The gate of a single process: exact counts in a dict."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()
        self._total = 0

    def admit(self, address: str, total: int, per_address: int) -> bool:
        if self._total >= total or self._count[address] >= per_address:
            return False
        self._count[address] += 1
        self._total += 1
        return True

    def release(self, address: str) -> None:
        self._total -= 1
        self._count[address] -= 1
        if self._count[address] <= 0:
            del self._count[address]

    def total(self) -> int:
        return self._total


class SharedCounts:
    """The shared-memory table behind ``SharedGate``: one row per worker slot.

    Created by the supervisor (``create``) on an anonymous file whose
    descriptor each worker inherits and maps (``attach``).
    """

    def __init__(self, fd: int, *, owner: bool) -> None:
        self.fd = fd
        self.owner = owner
        head = os.pread(fd, _HEADER.size, 0)
        magic, rows, columns, key = _HEADER.unpack(head)
        if magic != _MAGIC:
            raise ValueError("not a mailbag connection table")
        self.rows, self.columns, self._key = rows, columns, bytes(key)
        self._row_size = _ROW_HEAD + 4 * columns  # two hashes x columns x u16
        self._map = mmap.mmap(fd, _HEADER.size + rows * self._row_size)
        self._totals = [
            memoryview(self._map)[start:start + 4].cast("I") for start in self._row_starts()
        ]
        self._cells = [
            memoryview(self._map)[start + _ROW_HEAD:start + self._row_size].cast("H")
            for start in self._row_starts()
        ]

    def _row_starts(self) -> list[int]:
        return [_HEADER.size + row * self._row_size for row in range(self.rows)]

    @classmethod
    def create(cls, rows: int, columns: int = COLUMNS) -> SharedCounts:
        """A fresh zeroed table for ``rows`` workers, on a memory-backed file."""
        try:
            fd = os.memfd_create("mailbag-connections", 0)  # inheritable: workers map it
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            import tempfile

            with tempfile.TemporaryFile() as backing:
                fd = os.dup(backing.fileno())
        os.set_inheritable(fd, True)
        os.ftruncate(fd, _HEADER.size + rows * (_ROW_HEAD + 4 * columns))
        os.pwrite(fd, _HEADER.pack(_MAGIC, rows, columns, secrets.token_bytes(16)), 0)
        return cls(fd, owner=True)

    @classmethod
    def attach(cls, fd: int) -> SharedCounts:
        """Map a table created by the supervisor (a worker's side)."""
        return cls(fd, owner=False)

    def columns_of(self, address: str) -> tuple[int, int]:
        """The two counter positions of ``address`` (keyed, so nobody can choose collisions)."""
        digest = hashlib.blake2b(address.encode(), key=self._key, digest_size=8).digest()
        first, second = struct.unpack("<II", digest)
        return first % self.columns, self.columns + second % self.columns

    def lock(self) -> None:
        """Exclusive record lock on the table (per process; dropped if the process dies)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        """Release ``lock``."""
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def count(self, address_columns: tuple[int, int]) -> int:
        """An address's connections over every row (never an under-count)."""
        first, second = address_columns
        return min(sum(cells[first] for cells in self._cells),
                   sum(cells[second] for cells in self._cells))

    def grand_total(self) -> int:
        """Connections counted over every row."""
        return sum(total[0] for total in self._totals)

    def add(self, row: int, address_columns: tuple[int, int], delta: int) -> None:
        """Change one row's counts for one address (only that row's worker calls this)."""
        cells = self._cells[row]
        for column in address_columns:
            cells[column] = max(0, min(COLUMN_MAX, cells[column] + delta))
        self._totals[row][0] = max(0, self._totals[row][0] + delta)

    def row_total(self, row: int) -> int:
        """Connections held by the worker in ``row``."""
        return int(self._totals[row][0])

    def clear_row(self, row: int) -> None:
        """Forget everything a worker held (it died, and its connections with it)."""
        self.lock()
        try:
            start = _HEADER.size + row * self._row_size
            self._map[start:start + self._row_size] = bytes(self._row_size)
        finally:
            self.unlock()

    def close(self) -> None:
        """Unmap (and close the descriptor)."""
        self._totals.clear()
        self._cells.clear()
        self._map.close()
        os.close(self.fd)


class SharedGate:
    """A worker's gate over the shared table: global caps, local bookkeeping only in its row."""

    def __init__(self, counts: SharedCounts, row: int) -> None:
        self.counts = counts
        self.row = row

    def admit(self, address: str, total: int, per_address: int) -> bool:
        counts = self.counts
        columns = counts.columns_of(address)
        counts.lock()
        try:
            if counts.grand_total() >= total or counts.count(columns) >= min(
                per_address, COLUMN_MAX
            ):
                return False
            counts.add(self.row, columns, +1)
            return True
        finally:
            counts.unlock()

    def release(self, address: str) -> None:
        # No lock: only this process writes its row, and a late decrement can only
        # make another worker refuse once more, never admit over the cap.
        self.counts.add(self.row, self.counts.columns_of(address), -1)

    def total(self) -> int:
        return self.counts.grand_total()

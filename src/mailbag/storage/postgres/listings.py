"""Message lists kept between sessions, valid while the maildrop's version holds.

Most POP3 sessions find nothing new: a client that leaves mail on the
server logs in every few minutes, lists the same UIDLs and leaves.  Reading
and decoding the whole list at every login costs the database an index
scan and an aggregate per message, and this node a tuple per message; for a
100,000-message maildrop that is most of the login.

``maildrops.version`` goes up in the same transaction as every change to a
maildrop's messages (delivery, QUIT's deletions, an import).  A node keeps
the list it last read together with that version.  The next open on the
node takes the lease by id and reads only the version
(``LeaseKeeper.acquire_known``); the list is read again only if the version
moved.  The open's snapshot is the one the version was read in, so a list
reused this way is exactly the list the database would have returned.

The cache is per process and bounded by the number of messages it holds
(``DEFAULT_BUDGET``); the least recently used lists go first, and a list
larger than half the budget is not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from mailbag.storage.base import MessageInfo

#: Messages kept over all lists of one process (about 300 bytes each).
DEFAULT_BUDGET = 200_000


class Stored(NamedTuple):
    """Where a snapshot message lives: its arrival sequence, wire size, row count.

    ``position`` is its index in the snapshot (0-based), for read-ahead.  A
    NamedTuple, not a frozen dataclass: one is built per message at every
    open, and a frozen dataclass's ``__init__`` costs several times more.
    """

    seq: int
    wire_size: int
    chunks: int
    position: int = 0


class Listing(NamedTuple):
    """A maildrop's message list as of ``version`` (never changed once built)."""

    maildrop_id: int
    version: int
    stored: dict[str, Stored]
    messages: Sequence[MessageInfo]

    @classmethod
    def build(
        cls,
        maildrop_id: int,
        version: int,
        seqs: list[int],
        uids: list[str],
        sizes: list[int],
        chunks: list[int],
    ) -> Listing:
        """From the four arrays of a ``LISTING`` row, in arrival order.

        Built with map/zip, not a loop per message: this is the per-message
        cost of every open that reads the list.
        """
        stored = dict(zip(uids, map(Stored, seqs, sizes, chunks, range(len(uids))), strict=True))
        return cls(maildrop_id, version, stored, tuple(map(MessageInfo, uids, sizes)))


class ListingCache:
    """The last list read per maildrop name, least recently used out first."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self._lists: OrderedDict[str, Listing] = OrderedDict()
        self._held = 0

    def __len__(self) -> int:
        return len(self._lists)

    def version(self, name: str) -> int:
        """The version of the list kept for ``name``, or -1 (versions start at 0)."""
        found = self._lists.get(name)
        return -1 if found is None else found.version

    def latest(self, name: str) -> Listing | None:
        """The list kept for ``name``, whatever its version (the caller checks it)."""
        found = self._lists.get(name)
        if found is not None:
            self._lists.move_to_end(name)
        return found

    def get(self, name: str, maildrop_id: int, version: int) -> Listing | None:
        """The kept list if it is of this maildrop at this version."""
        found = self._lists.get(name)
        if found is None or found.version != version or found.maildrop_id != maildrop_id:
            return None
        self._lists.move_to_end(name)
        return found

    def put(self, name: str, listing: Listing) -> None:
        """Keep ``listing`` for ``name`` (replacing an older one), within the budget."""
        self.forget(name)
        size = len(listing.messages)
        if size > self.budget // 2:
            return
        self._lists[name] = listing
        self._held += size
        while self._held > self.budget:
            _, dropped = self._lists.popitem(last=False)
            self._held -= len(dropped.messages)

    def forget(self, name: str) -> None:
        """Drop the list kept for ``name``, if any."""
        dropped = self._lists.pop(name, None)
        if dropped is not None:
            self._held -= len(dropped.messages)

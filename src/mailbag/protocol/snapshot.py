"""The maildrop as a POP3 session sees it: fixed message numbers, sizes, UIDLs, DELE marks.

Taken at login and never changed by storage during the session (RFC 1939
section 4: message numbers stay fixed); DELE only sets a mark here, and the
marked UIDLs go to storage once, at QUIT (section 6).  One parser turns
message numbers into 0-based indexes with Dovecot-like errors, for every
command that takes one (DESIGN.md rules 3 and 4: ``msn`` on the wire,
``idx`` inside).
"""

from __future__ import annotations

from collections.abc import Sequence

from mailbag.protocol.events import MessageListing

#: Longest message number we parse; anything longer is certainly out of range.
MAX_NUMBER_DIGITS = 10


class Pop3Error(Exception):
    """A command-level failure whose text goes to the client after ``-ERR``."""


class Snapshot:
    """UIDL and size per message, and the deletion marks (0-based ``idx``)."""

    __slots__ = ("deleted", "sizes", "uids")

    def __init__(self, messages: Sequence[MessageListing] = ()) -> None:
        # Storage may hand over its snapshot as columns (``storage.base.MessageList``);
        # copying two lists is C-speed, building 100,000 items to take them apart is not.
        uids: Sequence[str] | None = getattr(messages, "uids", None)
        sizes: Sequence[int] | None = getattr(messages, "sizes", None)
        if uids is not None and sizes is not None and len(uids) == len(sizes) == len(messages):
            self.uids = list(uids)
            self.sizes = list(sizes)
        else:
            self.uids = [m.uid for m in messages]
            self.sizes = [m.size for m in messages]
        self.deleted: set[int] = set()

    def parse_msn(self, raw: bytes, *, allow_deleted: bool = False) -> int:
        """Parse a message number into a 0-based idx (one parser for every command)."""
        if not raw.isdigit() or len(raw) > MAX_NUMBER_DIGITS:
            shown = raw[:20].decode("ascii", "replace") if raw.isascii() else "?"
            raise Pop3Error(f"Invalid message number: {shown}")
        msn = int(raw)
        if msn < 1 or msn > len(self.uids):
            raise Pop3Error(f"There's no message {msn}.")
        idx = msn - 1
        if idx in self.deleted and not allow_deleted:
            raise Pop3Error(f"Message {msn} is deleted.")
        return idx

    def totals(self) -> tuple[int, int]:
        """Messages and octets not marked deleted."""
        if not self.deleted:  # the usual case; 100,000 messages make the filter show
            return len(self.sizes), sum(self.sizes)
        live = [s for i, s in enumerate(self.sizes) if i not in self.deleted]
        return len(live), sum(live)

    def listing(self, column: Sequence[object]) -> list[str]:
        """``msn value`` lines for LIST (sizes) or UIDL (uids), deleted messages left out."""
        deleted = self.deleted
        if deleted:
            return [f"{i + 1} {column[i]}" for i in range(len(column)) if i not in deleted]
        # No per-line test and no filter: a 100,000-line UIDL is one fast pass.
        return [f"{i} {v}" for i, v in enumerate(column, 1)]

    def marked_uids(self) -> tuple[str, ...]:
        """UIDLs to remove at QUIT, in message order."""
        return tuple(self.uids[i] for i in sorted(self.deleted))

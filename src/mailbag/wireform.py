"""The wire form of a stored message: CRLF line endings, ending in CRLF.

Maildir files usually hold bare LF line endings; POP3 sends CRLF.  Storage
needs the wire size (for ``,W=``, STAT and LIST) and the protocol needs the
wire bytes (for RETR and TOP), so both use this one definition and the two
can never disagree.  It sits at the bottom layer because storage and protocol
must not import each other (DESIGN.md).

The conversion is done with ``bytes.replace`` on large chunks (no Python loop
per line); a CR at the end of a chunk is held back so that a CRLF split
across two chunks is still recognised.
"""

from __future__ import annotations

from collections.abc import Iterable

CRLF = b"\r\n"


class CrlfNormalizer:
    """Streaming LF -> CRLF conversion with state that spans chunks.

    Existing CRLF pairs are kept, bare LF becomes CRLF, a lone CR is passed
    through unchanged.  ``finish`` appends the final CRLF if the message did
    not end with one, so every message ends on a line boundary.
    """

    __slots__ = ("_at_line_start", "_pending_cr")

    def __init__(self) -> None:
        self._pending_cr = False
        self._at_line_start = True

    def feed(self, chunk: bytes) -> bytes:
        """Convert one chunk; may hold back a trailing CR until the next call."""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        if b"\n" in chunk:
            # Maildir files usually hold bare LF only: then one pass does it.
            # A file already in CRLF form (every LF has its CR) stays as it is.
            if b"\r" not in chunk:
                chunk = chunk.replace(b"\n", CRLF)
            elif chunk.count(b"\n") != chunk.count(CRLF):
                chunk = chunk.replace(CRLF, b"\n").replace(b"\n", CRLF)
        self._at_line_start = chunk.endswith(CRLF)
        return chunk

    def finish(self) -> bytes:
        """Return what is still held back plus the CRLF that ends the message."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = b"\r"
            self._at_line_start = False
        if not self._at_line_start:
            tail += CRLF
            self._at_line_start = True
        return tail


def to_wire(data: bytes) -> bytes:
    """Return the whole wire form of ``data`` (for small messages and tests)."""
    normalizer = CrlfNormalizer()
    return normalizer.feed(data) + normalizer.finish()


def wire_size(chunks: Iterable[bytes]) -> int:
    """Count the octets of the wire form without building it in memory.

    ``size = len + (bare LFs) [+ 2 if the message does not end in a newline]``;
    computed per chunk with ``bytes.count``, with a CR split across chunk
    boundaries accounted for.
    """
    total = 0
    prev_last = b""
    last = b""
    empty = True
    for chunk in chunks:
        if not chunk:
            continue
        empty = False
        lf = chunk.count(b"\n")
        crlf = chunk.count(CRLF)
        if prev_last == b"\r" and chunk[:1] == b"\n":
            crlf += 1
        total += len(chunk) + lf - crlf
        prev_last = chunk[-1:]
        last = chunk
    if empty:
        return 0
    if not last.endswith(b"\n"):
        total += 2
    return total

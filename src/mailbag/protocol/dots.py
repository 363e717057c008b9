"""The dot codec (RFC 1939 section 3, RFC 5321 section 4.5.2): one for every side.

A multi-line body on the wire has CRLF line endings, a ``.`` added in front
of every line that starts with one, and ends with ``CRLF . CRLF``.  The POP3
server encodes RETR/TOP bodies (``MessageEncoder``); the LMTP server and the
POP3 client decode (``DotDecoder``).  Both work on whole chunks with bytes
operations (``find``/``replace``), never a loop per line, and keep state
across chunk edges, because TCP and storage may cut anywhere: a CR at the end
of one chunk, a dot at the start of the next (DESIGN.md rule 7; Twisted's
per-chunk stuffing got this wrong).
"""

from __future__ import annotations

import re

from mailbag.wireform import CRLF, CrlfNormalizer

TERMINATOR = b"\r\n.\r\n"
#: A line that starts with a dot.  ``re.sub`` rather than ``bytes.replace``: for a
#: three-byte pattern ``replace`` (and ``in``) crawl through the text a byte or two
#: at a time, the regex engine jumps from CR to CR; measured 3x faster on a 10 KB
#: message, and a quarter of the CPU of a 1 MiB RETR before the change.
_DOT_LINE = re.compile(rb"\r\n\.")
#: Suffixes of a chunk that may be the start of the terminator (longest first).
_HOLD = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


class DotDecoder:
    """Decode a dot-terminated body: find CRLF.CRLF, remove dot-stuffing, stream the rest.

    ``feed`` returns the decoded bytes that are now certain.  Only CRLF.CRLF
    ends the body (a bare LF before the dot does not, which closes the
    "SMTP smuggling" class of bugs).  The decoder starts with a virtual CRLF
    in front of the data, so the first line is "at line start" like every
    other, and it holds back at most the four bytes that could still become
    the terminator, so memory stays bounded whatever the line length.  After
    the terminator, ``done`` is true and ``trailing`` holds the bytes that
    followed it (a pipelined next command or response).
    """

    __slots__ = ("_drop", "_held", "done", "trailing")

    def __init__(self) -> None:
        self._held = b"\r\n"
        self._drop = 2  # the virtual CRLF, removed from the output
        self.done = False
        self.trailing = b""

    def feed(self, chunk: bytes) -> bytes:
        """Decode ``chunk``; once the terminator is seen, later bytes go to ``trailing``."""
        if self.done:
            self.trailing += chunk
            return b""
        data = self._held + chunk if self._held else chunk
        end = data.find(TERMINATOR)
        if end >= 0:
            out = data[: end + 2]
            self.trailing = data[end + len(TERMINATOR) :]
            self._held = b""
            self.done = True
        else:
            hold = next((h for h in _HOLD if data.endswith(h)), b"")
            self._held = hold
            out = data[: len(data) - len(hold)] if hold else data
        out = _DOT_LINE.sub(b"\r\n", out)
        if self._drop:
            cut = min(self._drop, len(out))
            out = out[cut:]
            self._drop -= cut
        return out


def stuff(message: bytes) -> bytes:
    """Encode a CRLF message as a dot-stuffed, terminated body (small messages, tools, tests)."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + b".\r\n"


class MessageEncoder:
    """Stream a stored message as a RETR/TOP body: CRLF, dot-stuffed, terminated.

    ``body_lines`` is TOP's line count (None for RETR).  Once the limit is
    reached ``done`` becomes True and the caller can stop reading storage.
    """

    __slots__ = ("_body_lines", "_in_body", "_normalizer", "_prev_crlf", "_remaining", "done")

    def __init__(self, body_lines: int | None = None) -> None:
        self._normalizer = CrlfNormalizer()
        self._body_lines = body_lines
        self._remaining = body_lines if body_lines is not None else -1
        self._in_body = False
        self._prev_crlf = True  # emitted output so far ends at a line start
        self.done = False

    def _stuff(self, data: bytes) -> bytes:
        """Dot-stuff complete CRLF text; the state remembers whether we are at a line start."""
        if not data:
            return data
        data = _DOT_LINE.sub(b"\r\n..", data)  # the same object when there is none
        if self._prev_crlf and data[:1] == b".":
            data = b"." + data
        self._prev_crlf = data.endswith(CRLF)
        return data

    def _limit_top(self, data: bytes) -> bytes:
        """Cut ``data`` (CRLF form, starting at the current position) for TOP."""
        if self._body_lines is None:
            return data
        start = 0
        if not self._in_body:
            # Look for the empty line that ends the header, allowing it to
            # straddle the previous chunk (previous output ended with CRLF).
            if self._prev_crlf and data.startswith(CRLF):
                sep_end = 2
            else:
                sep = data.find(b"\r\n\r\n")
                if sep < 0:
                    return data
                sep_end = sep + 4
            self._in_body = True
            start = sep_end
        pos = start
        while self._remaining > 0:
            nl = data.find(b"\n", pos)
            if nl < 0:
                return data
            self._remaining -= 1
            pos = nl + 1
        self.done = True
        return data[:pos]

    def feed(self, chunk: bytes) -> bytes:
        """Encode one chunk of the stored message."""
        if self.done:
            return b""
        return self._stuff(self._limit_top(self._normalizer.feed(chunk)))

    def finish(self) -> bytes:
        """Flush held-back bytes, end the last line, and add the ``.`` terminator."""
        tail = b"" if self.done else self._limit_top(self._normalizer.finish())
        tail = self._stuff(tail)
        if not self._prev_crlf:
            tail += CRLF
        return tail + b".\r\n"


def encode_message(data: bytes, body_lines: int | None = None) -> bytes:
    """Encode a whole message at once (small messages and tests)."""
    encoder = MessageEncoder(body_lines)
    return encoder.feed(data) + encoder.finish()


def encode_whole(data: bytes) -> tuple[bytes, bytes, bytes]:
    """RETR's body of a whole stored message as ``(head, body, tail)``; joined = ``encode_message``.

    The usual Maildir file (bare LF, no CR at all) takes two passes, one
    ``replace`` and one regex, and no encoder object; the parts are returned
    unjoined so the caller can join them with the status line in one copy
    (a small RETR used to copy its body three times here).  A file with any CR
    (CRLF, lone CRs) takes the general encoder.
    """
    if b"\r" in data:
        return b"", encode_message(data), b""
    body = _DOT_LINE.sub(b"\r\n..", data.replace(b"\n", CRLF))
    head = b"." if body[:1] == b"." else b""
    tail = b".\r\n" if not body or body[-2:] == CRLF else b"\r\n.\r\n"
    return head, body, tail

"""Streaming decoder for POP3 multi-line responses (RFC 1939 section 3).

``poplib`` reads a multi-line response one line at a time into a Python list
and refuses lines over 2,048 octets; a 30 MB attachment becomes hundreds of
thousands of list items, and base64 from some mailers (or HTML on one line)
trips the limit.  This decoder works on whole received chunks instead:

* the terminator ``CRLF . CRLF`` is found with ``bytes.find``;
* byte-unstuffing is one ``bytes.replace(b"\\r\\n.", b"\\r\\n")`` per chunk
  (RFC 1939: a line starting with "." has had a "." prepended);
* output is cut at the last CRLF of each chunk so the line-start state is
  exact at every chunk edge; a line with no CRLF is passed on in pieces, so
  memory stays bounded whatever the line length.
"""

from __future__ import annotations

#: Bytes of an unterminated line held back before passing it on in pieces.
MAX_HELD_LINE = 64 * 1024


class DotUnstuffer:
    """Feed raw bytes after the ``+OK`` line; get message bytes back.

    ``feed`` returns the decoded bytes that are now certain.  After the
    terminator is seen, :attr:`done` is true and :attr:`trailing` holds any
    bytes that followed it (a pipelined next response).
    """

    __slots__ = ("_at_line_start", "_held", "done", "trailing")

    def __init__(self) -> None:
        self._held = b""
        self._at_line_start = True
        self.done = False
        self.trailing = b""

    def feed(self, chunk: bytes) -> bytes:
        """Decode ``chunk``; may hold back an undecided line start or a CR."""
        if self.done:
            self.trailing += chunk
            return b""
        data = self._held + chunk if self._held else chunk
        self._held = b""
        if self._at_line_start:
            # "", "." and ".\r" could still become the terminator: wait.
            if len(data) < 3 and b".\r\n".startswith(data):
                self._held = data
                return b""
            if data.startswith(b".\r\n"):
                self.done = True
                self.trailing = data[3:]
                return b""
            if data[:1] == b".":
                data = data[1:]
            self._at_line_start = False
        end = data.find(b"\r\n.\r\n")
        if end >= 0:
            self.done = True
            self.trailing = data[end + 5 :]
            return _unstuff(data[: end + 2])
        cut = data.rfind(b"\r\n")
        lines, rest = (data[: cut + 2], data[cut + 2 :]) if cut >= 0 else (b"", data)
        if cut >= 0 and len(rest) <= MAX_HELD_LINE:
            self._held = rest
            self._at_line_start = True
            return _unstuff(lines)
        # Mid-line bytes (no CRLF yet, or a very long line): pass them on,
        # keeping a final CR in case its LF and a dot arrive next.
        if cut >= 0 and rest[:1] == b".":
            rest = rest[1:]
        if rest.endswith(b"\r"):
            rest, self._held = rest[:-1], b"\r"
        return _unstuff(lines) + rest


def _unstuff(lines: bytes) -> bytes:
    """Remove the stuffed dot from every line start after the first."""
    return lines.replace(b"\r\n.", b"\r\n") if b"\r\n." in lines else lines


def stuff(message: bytes) -> bytes:
    """Encode a CRLF message as a multi-line response body (for tests and tools)."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + b".\r\n"

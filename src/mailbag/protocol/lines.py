"""Line framing for command input, and the encoder for multi-line responses.

Input side (``LineReader``): splits client bytes into lines with a hard length
limit, accepts CRLF and bare LF (RFC 1939 requires CRLF from clients, but real
terminals and scripts send LF), strips telnet IAC negotiation, and applies
backspace/DEL editing so a person typing into a raw terminal, as in the seed
document's telnet session, gets what they meant rather than a password full
of control bytes.  All of this keeps state across chunks, because TCP may
split a line (or an IAC sequence) anywhere.

Output side (``MessageEncoder``): turns a stored message into the body of a
RETR/TOP response: CRLF line endings, dot-stuffing (RFC 1939 section 3), the
TOP line limit, and the ``.`` terminator, working on whole chunks with bytes
operations and keeping state across chunk edges (DESIGN.md rule 7).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailbag.wireform import CRLF, CrlfNormalizer

IAC = 0xFF
SB = 0xFA
SE = 0xF0
WILL, WONT, DO, DONT = 0xFB, 0xFC, 0xFD, 0xFE
BACKSPACE = 0x08
DELETE = 0x7F

_DATA, _IAC, _OPTION, _SUB, _SUB_IAC = range(5)


@dataclass(frozen=True, slots=True)
class Line:
    """One complete input line, without its terminator."""

    data: bytes


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A line exceeded the limit; its bytes up to the next LF are discarded."""

    limit: int


def apply_erase(line: bytes) -> bytes:
    """Apply BS/DEL editing: each erases the previous character.

    A multi-byte UTF-8 character is erased whole, because a terminal sends one
    DEL per character the user sees, not per byte.
    """
    if BACKSPACE not in line and DELETE not in line:
        return line
    out = bytearray()
    for byte in line:
        if byte in (BACKSPACE, DELETE):
            while out and 0x80 <= out[-1] <= 0xBF:  # UTF-8 continuation bytes
                out.pop()
            if out:
                out.pop()
        else:
            out.append(byte)
    return bytes(out)


class LineReader:
    """Bounded line splitter with telnet and terminal-editing tolerance."""

    __slots__ = ("_buffer", "_discarding", "_iac_state", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._iac_state = _DATA
        self._discarding = False

    def _strip_telnet(self, data: bytes) -> bytes:
        """Remove telnet command sequences (RFC 854); keep ``IAC IAC`` as 0xFF."""
        if self._iac_state == _DATA and IAC not in data:
            return data
        out = bytearray()
        state = self._iac_state
        for byte in data:
            if state == _DATA:
                if byte == IAC:
                    state = _IAC
                else:
                    out.append(byte)
            elif state == _IAC:
                if byte == IAC:
                    out.append(IAC)
                    state = _DATA
                elif byte in (WILL, WONT, DO, DONT):
                    state = _OPTION
                elif byte == SB:
                    state = _SUB
                else:
                    state = _DATA
            elif state == _OPTION:
                state = _DATA
            elif state == _SUB:
                if byte == IAC:
                    state = _SUB_IAC
            else:  # _SUB_IAC
                state = _DATA if byte == SE else _SUB
        self._iac_state = state
        return bytes(out)

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        data = self._strip_telnet(data)
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            self._discarding = False
            data = data[newline + 1 :]
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as lines."""
        return len(self._buffer)

    def take_buffer(self) -> bytes:
        """Remove and return everything buffered (used to detect STLS injection)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_line(self) -> Line | LineTooLong | None:
        """Return the next complete line, a too-long notice, or None if more data is needed."""
        newline = self._buffer.find(b"\n")
        if newline < 0:
            if len(self._buffer) > self.limit:
                self._buffer.clear()
                self._discarding = True
                return LineTooLong(self.limit)
            return None
        if newline > self.limit + 1:  # +1 tolerates the CR of CRLF
            del self._buffer[: newline + 1]
            return LineTooLong(self.limit)
        raw = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        # CR before LF ends the line; telnet sends a lone CR as "CR NUL" (RFC 854),
        # so a client piping "\r\n" through telnet produces "CR NUL CR LF".
        raw = raw.rstrip(b"\r\0")
        return Line(apply_erase(raw))


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
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n..")
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

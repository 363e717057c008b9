"""Line framing for command input: one framer for the POP3 and LMTP cores.

``LineReader`` splits client bytes into lines with a hard length limit and
accepts CRLF and bare LF (RFC 1939 and RFC 5321 require CRLF from clients,
but real terminals and scripts send LF).  For POP3 (``terminal=True``) it
also strips telnet IAC negotiation and applies backspace/DEL editing, so a
person typing into a raw terminal, as in the seed document's telnet session,
gets what they meant rather than a password full of control bytes.  LMTP
turns that off: its peer is an MTA, and bytes buffered after ``DATA`` are
message data that must reach the dot decoder untouched.  All of this keeps
state across chunks, because TCP may split a line (or an IAC sequence)
anywhere.  Bodies are coded by ``dots``.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    __slots__ = ("_buffer", "_discarding", "_iac_state", "limit", "terminal")

    def __init__(self, limit: int, *, terminal: bool = True) -> None:
        self.limit = limit
        self.terminal = terminal
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
        if self.terminal:
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
        if not self.terminal:
            return Line(raw.rstrip(b"\r"))
        raw = raw.rstrip(b"\r\0")
        return Line(apply_erase(raw))

"""SASL framing for POP3 AUTH (RFC 5034), with PLAIN (RFC 4616) decoded in place, sans-IO.

The POP3 core owns the conversation (states, errors, replies); this module
owns the wire form of one AUTH exchange: base64 in both directions, ``=``
for an empty initial response, ``*`` to cancel, the line-length limit for
continuation lines, and PLAIN's ``[authzid] NUL authcid NUL passwd``.  Other
mechanisms (SCRAM) run in the session, which sees decoded bytes only.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ToDriver:
    """A decoded client response for the session's mechanism (``None``: no initial response)."""

    data: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class Credentials:
    """PLAIN decoded: check this password."""

    authzid: str
    authcid: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``+ base64(data)`` and wait for the client's response line."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Invalid:
    """The exchange failed on the wire; ``text`` goes after ``-ERR``."""

    text: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The client sent ``*`` (RFC 5034 section 4)."""


Step = ToDriver | Credentials | Challenge | Invalid | Cancelled


def decode_base64(raw: bytes) -> bytes | None:
    """Strict base64; ``=`` alone is the empty response (RFC 5034 section 4)."""
    if raw == b"=":
        return b""
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None


def challenge_line(data: bytes) -> bytes:
    """The ``+ base64`` continuation line (an empty challenge is ``+ ``)."""
    return b"+ " + base64.b64encode(data) + b"\r\n"


def parse_plain(data: bytes) -> Credentials | Invalid:
    """RFC 4616: ``[authzid] NUL authcid NUL passwd``, all UTF-8."""
    parts = data.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        return Invalid("Invalid PLAIN authentication data.")
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        return Invalid("Invalid PLAIN authentication data.")
    return Credentials(authzid, authcid, password)


class SaslExchange:
    """The wire side of one AUTH exchange, from the AUTH line to the verdict."""

    __slots__ = ("max_line", "mechanism")

    def __init__(self, mechanism: str, max_line: int) -> None:
        self.mechanism = mechanism
        self.max_line = max_line

    @property
    def in_session(self) -> bool:
        """True when the session runs the mechanism (everything but PLAIN)."""
        return self.mechanism != "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        """The AUTH line's optional initial response (still base64)."""
        data = None
        if initial is not None:
            data = decode_base64(initial)
            if data is None:
                return Invalid("Invalid base64 data in initial response.")
        if self.in_session:
            return ToDriver(data)
        return Challenge(b"") if data is None else parse_plain(data)

    def line(self, line: bytes) -> Step:
        """One continuation line from the client."""
        if len(line) + 2 > self.max_line:
            return Invalid("Authentication line too long.")
        line = line.strip()
        if line == b"*":
            return Cancelled()
        data = decode_base64(line) if line else b""
        if data is None:
            return Invalid("Invalid base64 data in continued response.")
        return ToDriver(data) if self.in_session else parse_plain(data)

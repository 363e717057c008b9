"""The contract every sans-IO core follows, and the POP3 core's events and answers.

A core (``Pop3Connection``, ``LmtpConnection``) is driven with three calls,
as in h11 (DESIGN.md): ``receive_data(bytes)`` adds client bytes,
``next_event()`` returns what happens next, and ``send(answer)`` gives the
core the outcome of I/O it asked for.  Every byte for the client leaves the
core as a ``Reply`` event, the greeting first; nothing is returned from
``send``.  Request events (``Login``, ``SendMessage``, ...) pause the core
until the driver answers them, so pipelined commands wait and replies come
back in order (RFC 2449 PIPELINING, RFC 2920).

A RETR/TOP body is a state of the core, not a loop in the driver: after
``MessageOpened`` the core asks for each stored chunk with ``NeedBody``, the
driver answers ``BodyChunk`` (or ``BodyEnd`` when storage has no more), the
core replies with the encoded (CRLF, dot-stuffed) bytes, and the body ends
with ``EndOfMessage``.  The driver cannot run ahead of the core.

``Abort`` is the one answer every core takes at any time: the driver ends
the conversation (timeout, shutdown, internal error) and the core says so in
its own words, then emits ``Close``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# --------------------------------------------------------------- common events


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing more can happen until more bytes arrive."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes to send to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after writing the replies before it."""

    reason: str


AbortReason = Literal["timeout", "shutdown", "internal error"]


@dataclass(frozen=True, slots=True)
class Abort:
    """Answer: end the conversation now; the core queues its last words and ``Close``."""

    reason: AbortReason


class SansIOCore(Protocol):
    """What a driver needs from a core (``session.driver.Driver`` runs any of them)."""

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client; ``b""`` means the client closed its side."""

    def next_event(self) -> object:
        """The next event; ``NeedData`` when the core needs more bytes."""

    def send(self, answer: object) -> None:
        """Answer the request event the core is waiting on (or ``Abort``)."""


# ------------------------------------------------------- POP3 request events


class MessageListing(Protocol):
    """What the snapshot needs from storage's ``MessageInfo`` (structural, no import)."""

    @property
    def uid(self) -> str: ...

    @property
    def size(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Login:
    """Check a user name and password (USER/PASS, or SASL PLAIN)."""

    user: str
    password: str = field(repr=False)
    mechanism: str = "USER"
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class ApopLogin:
    """Check an APOP digest (RFC 1939 section 7) against ``timestamp``."""

    user: str
    digest: str = field(repr=False)
    timestamp: str = ""


@dataclass(frozen=True, slots=True)
class SaslStart:
    """Begin a SASL exchange (RFC 5034); ``initial`` is the decoded initial response."""

    mechanism: str
    initial: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SaslContinue:
    """One decoded client response inside a SASL exchange."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SaslAbort:
    """Notice (no answer): the exchange ended early; forget the mechanism's state."""


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Open message ``msn`` (RETR, or TOP with ``body_lines``); answer ``MessageOpened``."""

    msn: int
    uid: str
    size: int
    body_lines: int | None = None


@dataclass(frozen=True, slots=True)
class NeedBody:
    """Inside a body: give the next stored chunk (``BodyChunk``) or ``BodyEnd``."""


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """Notice (no answer): the body of ``msn`` is complete, terminator included."""

    msn: int
    top: bool


@dataclass(frozen=True, slots=True)
class Commit:
    """QUIT from TRANSACTION: remove these messages (UPDATE state, RFC 1939 section 6)."""

    uids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StartTls:
    """The ``+OK`` to STLS was replied; negotiate TLS (RFC 2595 section 4), then ``TlsStarted``."""


Event = (
    NeedData
    | Reply
    | Login
    | ApopLogin
    | SaslStart
    | SaslContinue
    | SaslAbort
    | SendMessage
    | NeedBody
    | EndOfMessage
    | Commit
    | StartTls
    | Close
)

# ------------------------------------------------------------- POP3 answers


@dataclass(frozen=True, slots=True)
class LoginAccepted:
    """Answer to a login: enter TRANSACTION with this maildrop snapshot."""

    user: str
    messages: Sequence[MessageListing] = field(repr=False)


@dataclass(frozen=True, slots=True)
class LoginRefused:
    """Answer to a login (or SASL step): stay in AUTHORIZATION with this ``-ERR`` text."""

    text: str = "[AUTH] Authentication failed."


@dataclass(frozen=True, slots=True)
class SaslChallenge:
    """Answer to ``SaslStart``/``SaslContinue``: send ``+ base64`` and read a response line."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MessageOpened:
    """Answer to ``SendMessage``: the message is readable; the body state begins.

    ``whole``, when given, is the entire stored message (a small one, read at
    once): the core then sends the status line, the encoded body and the
    terminator as one reply and ends the body (``EndOfMessage``) without
    asking for chunks, which saves the driver four events per message.
    """

    whole: bytes | None = None


@dataclass(frozen=True, slots=True)
class MessageFailed:
    """Answer to ``SendMessage``: the message cannot be read; nothing was sent yet."""

    text: str


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Answer to ``NeedBody``: stored bytes (any line endings, any chunking)."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class BodyEnd:
    """Answer to ``NeedBody``: storage has no more bytes."""


@dataclass(frozen=True, slots=True)
class CommitDone:
    """Answer to ``Commit``: ``removed`` messages gone, ``failed`` could not be removed."""

    removed: int
    failed: int = 0
    text: str = ""


@dataclass(frozen=True, slots=True)
class TlsStarted:
    """Answer to ``StartTls``: TLS is up; everything from before is forgotten."""


Answer = (
    LoginAccepted
    | LoginRefused
    | SaslChallenge
    | MessageOpened
    | MessageFailed
    | BodyChunk
    | BodyEnd
    | CommitDone
    | TlsStarted
    | Abort
)

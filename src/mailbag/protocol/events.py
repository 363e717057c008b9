"""Events the POP3 state machine hands to its driver.

``Reply`` is bytes to write.  The other events ask the driver to do I/O the
sans-IO core cannot do itself (check a password, read a message, delete
messages, start TLS); the driver then calls back into the connection with the
outcome (``login_succeeded``, ``commit_finished``, ...), which produces the
reply.  Pipelined commands wait behind such an event, so replies always come
back in order (RFC 2449 PIPELINING).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing more can happen until more bytes arrive."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes to send to the client."""

    data: bytes


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
    """The client cancelled the exchange with ``*`` (the reply was already queued)."""


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Stream message ``msn`` (RETR, or TOP with ``body_lines``)."""

    msn: int
    uid: str
    size: int
    body_lines: int | None = None


@dataclass(frozen=True, slots=True)
class Commit:
    """QUIT from TRANSACTION: remove these messages (UPDATE state, RFC 1939 section 6)."""

    uids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StartTls:
    """The ``+OK`` to STLS was queued; negotiate TLS now (RFC 2595 section 4)."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after writing any queued reply."""

    reason: str


Event = (
    NeedData
    | Reply
    | Login
    | ApopLogin
    | SaslStart
    | SaslContinue
    | SaslAbort
    | SendMessage
    | Commit
    | StartTls
    | Close
)

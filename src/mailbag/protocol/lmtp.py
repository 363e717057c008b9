"""The LMTP server state machine (RFC 2033 over RFC 5321), sans-IO.

The same contract as the POP3 core (``events``): feed bytes with
``receive_data``, pull events with ``next_event`` until ``NeedData``, answer
requests with ``send``.  Two events ask the driver for I/O:
``CheckRecipient`` (is this address one of our accounts?), answered with
``RecipientChecked``, and ``DeliverMessage`` (store this message for these
recipients), answered with ``DeliveryDone``.  Pipelined commands (RFC 2920)
wait behind such an event, so replies always come back in command order.

The property LMTP exists for (RFC 2033 section 4.2) is enforced here, not
left to the driver: after the final dot there is exactly one reply per
*accepted* RCPT, in RCPT order, so one recipient over quota never turns
into a bounce or a duplicate for the others.  (``aiosmtpd``'s LMTP class
and ``smtplib.LMTP`` get this wrong, aiosmtpd#517 / bpo-32803.)

Message data is decoded by the shared ``dots.DotDecoder``: only CRLF.CRLF
ends it (a bare LF before the dot does not: no "SMTP smuggling"), a leading
dot is removed from each line (RFC 5321 section 4.5.2), and a dot or CRLF
split by TCP anywhere is handled.  Commands are framed by the shared
``lines.LineReader`` (without the POP3 terminal niceties).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailbag.protocol.dots import DotDecoder
from mailbag.protocol.events import Abort, Close, NeedData, Reply
from mailbag.protocol.lines import LineReader, LineTooLong

#: RFC 5321 section 4.5.3.1.4 allows 512 octets; SIZE/BODY/SMTPUTF8 parameters
#: and long UTF-8 addresses need more, and the limit only guards memory.
MAX_COMMAND_LINE = 2048
#: RFC 5321 section 4.5.3.1.8 requires at least 100 recipients per transaction.
MAX_RECIPIENTS = 1000
#: Consecutive bad commands after which the connection is closed.
MAX_ERRORS = 10


@dataclass(frozen=True, slots=True)
class LmtpPolicy:
    """Server-wide protocol settings (from the config)."""

    hostname: str = "localhost"
    #: Largest message accepted, in octets of decoded data (0 = no limit; RFC 1870).
    max_message_size: int = 0
    max_recipients: int = MAX_RECIPIENTS
    max_command_line: int = MAX_COMMAND_LINE
    max_errors: int = MAX_ERRORS


@dataclass(frozen=True, slots=True)
class Status:
    """One SMTP reply: code, RFC 3463 enhanced status code and text."""

    code: int
    enhanced: str
    text: str

    @property
    def ok(self) -> bool:
        """True for a 2yz reply."""
        return 200 <= self.code < 300

    def line(self) -> bytes:
        """The reply line, CRLF-terminated (RFC 2034: the enhanced code comes first)."""
        if not self.enhanced:  # 354 carries none (RFC 2034 section 3)
            return f"{self.code} {self.text}\r\n".encode()
        return f"{self.code} {self.enhanced} {self.text}\r\n".encode()


# Replies the core itself produces, named so tests can compare against them.
OK = Status(250, "2.0.0", "OK")
SENDER_OK = Status(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Status(250, "2.1.5", "Recipient OK")
START_DATA = Status(354, "", "Start mail input; end with <CRLF>.<CRLF>")
BYE = Status(221, "2.0.0", "Bye")
BAD_SEQUENCE = Status(503, "5.5.1", "Bad sequence of commands")
NO_VALID_RECIPIENTS = Status(503, "5.5.1", "No valid recipients")
UNKNOWN_COMMAND = Status(500, "5.5.1", "Command unrecognized")
USE_LHLO = Status(500, "5.5.1", "This is LMTP; use LHLO (RFC 2033 section 4.1)")
LINE_TOO_LONG = Status(500, "5.5.6", "Line too long")
TOO_MANY_ERRORS = Status(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_RECIPIENTS = Status(452, "4.5.3", "Too many recipients")
TOO_BIG = Status(552, "5.3.4", "Message size exceeds fixed maximum message size")
NO_VRFY = Status(252, "2.5.0", "Cannot VRFY user; send the message and we will try")
BAD_PARAMETER = Status(555, "5.5.4", "Parameter not recognized or not implemented")
SENDER_SYNTAX = Status(501, "5.1.7", "Bad sender address syntax")
RECIPIENT_SYNTAX = Status(501, "5.1.3", "Bad recipient address syntax")
TIMEOUT = Status(421, "4.4.2", "Timeout, closing connection")
SHUTTING_DOWN = Status(421, "4.3.2", "Service shutting down, try again later")
INTERNAL_ERROR = Status(421, "4.3.0", "Internal error, closing connection")
#: The core's last words for each ``Abort`` reason.
ABORT_STATUS = {"timeout": TIMEOUT, "shutdown": SHUTTING_DOWN, "internal error": INTERNAL_ERROR}


class State(enum.Enum):
    """Command sequencing (RFC 5321 section 4.1.4, RFC 2033 section 4)."""

    #: Greeted; only LHLO starts a session (RFC 2033 section 4.1).
    GREETED = "GREETED"
    #: Between transactions.
    READY = "READY"
    #: MAIL accepted; RCPT and DATA allowed.
    MAIL = "MAIL"
    #: Receiving message data after 354.
    DATA = "DATA"
    CLOSED = "CLOSED"


class Waiting(enum.Enum):
    """Which driver callback the machine is waiting for, if any."""

    NOTHING = enum.auto()
    RECIPIENT = enum.auto()
    DELIVERY = enum.auto()


@dataclass(frozen=True, slots=True)
class CheckRecipient:
    """Is ``address`` (from RCPT TO, without angle brackets) deliverable?"""

    address: str


@dataclass(frozen=True, slots=True)
class DeliverMessage:
    """Store ``message`` for each recipient; answer with one ``Status`` per recipient.

    ``message`` is the decoded data (dot-stuffing removed, CRLF line
    endings as sent).  ``recipients`` are in RCPT order and may repeat.
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes = field(repr=False)
    helo: str = ""


@dataclass(frozen=True, slots=True)
class RecipientChecked:
    """Answer to ``CheckRecipient``: a 2yz status accepts the address."""

    status: Status


@dataclass(frozen=True, slots=True)
class DeliveryDone:
    """Answer to ``DeliverMessage``: one status per recipient, in RCPT order."""

    statuses: Sequence[Status]


LmtpEvent = NeedData | Reply | Close | CheckRecipient | DeliverMessage


class _Body:
    """DATA being received: decoded chunks, kept while under the size limit."""

    __slots__ = ("chunks", "decoder", "limit", "size", "too_large")

    def __init__(self, limit: int) -> None:
        self.decoder = DotDecoder()
        self.limit = limit
        self.size = 0
        self.too_large = False
        self.chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        out = self.decoder.feed(data)
        if not out:
            return
        self.size += len(out)
        if self.limit and self.size > self.limit:
            # RFC 1870: keep reading to the final dot, but store nothing.
            self.too_large = True
            self.chunks.clear()
        if not self.too_large:
            self.chunks.append(out)


def _parse_path(text: str) -> str | None:
    """Parse ``<local@domain>`` (or ``<>``); None when it is not a valid path.

    An old-style source route (``<@a,@b:user@d>``, RFC 5321 section 4.1.2)
    is accepted and dropped, as section C of the RFC asks.  Quoted local
    parts are kept verbatim; UTF-8 is allowed (RFC 6531 SMTPUTF8).
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        return None
    path = text[1:-1]
    if path.startswith("@"):
        _, colon, path = path.partition(":")
        if not colon:
            return None
    if any(c in path for c in "<> \t") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return None
    return path


def _split_mail_argument(rest: str, prefix: str) -> tuple[str, list[str]] | None:
    """Split ``FROM:<path> PARAM...`` into the path and its parameters."""
    if rest[: len(prefix)].upper() != prefix:
        return None
    rest = rest[len(prefix) :].lstrip(" ")  # tolerate "MAIL FROM: <a@b>"
    if not rest.startswith("<"):
        return None
    close = rest.find(">")
    if close < 0:
        return None
    return rest[: close + 1], rest[close + 1 :].split()


Handler = Callable[["LmtpConnection", str], None]


class LmtpConnection:
    """One LMTP conversation, from greeting to close, without any I/O."""

    def __init__(self, policy: LmtpPolicy, *, greeting: str = "LMTP mailbag ready") -> None:
        self.policy = policy
        self.state = State.GREETED
        self.helo = ""
        self.sender: str | None = None
        self.recipients: list[str] = []
        self._reader = LineReader(policy.max_command_line, terminal=False)
        self._data_in: list[bytes] = []  # input received during DATA, not yet decoded
        self._events: deque[LmtpEvent] = deque()
        self._waiting = Waiting.NOTHING
        self._body: _Body | None = None
        self._errors_in_row = 0
        self._eof = False
        self._pending_recipient = ""
        # RFC 5321 section 4.2: the 220 banner.
        self._events.append(Reply(f"220 {policy.hostname} {greeting}\r\n".encode()))

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
        elif self.state is State.DATA:
            self._data_in.append(data)  # straight to the decoder: no copy into a buffer
        else:
            self._reader.feed(data)

    @property
    def waiting(self) -> bool:
        """True while the machine waits for an answer from the driver."""
        return self._waiting is not Waiting.NOTHING

    @property
    def idle(self) -> bool:
        """True between transactions with no unprocessed input (safe to close)."""
        return (
            self.state in (State.GREETED, State.READY)
            and not self.waiting
            and not self._reader.buffered
            and not self._events
        )

    def next_event(self) -> LmtpEvent:
        """Return the next event; process more input if none is queued."""
        while not self._events:
            if self.state is State.CLOSED:
                return Close("closed")
            if self.waiting:
                raise RuntimeError(f"next_event while waiting for {self._waiting.name} answer")
            if self.state is State.DATA:
                if not self._feed_data():
                    return self._need_data("client closed the connection during DATA")
                continue
            item = self._reader.next_line()
            if item is None:
                return self._need_data("client closed the connection")
            if isinstance(item, LineTooLong):
                self._error(LINE_TOO_LONG)
                continue
            self._handle_line(item.data)
        return self._events.popleft()

    def _need_data(self, reason: str) -> LmtpEvent:
        if self._eof:
            self.state = State.CLOSED
            return Close(reason)
        return NeedData()

    def _feed_data(self) -> bool:
        """Decode input received during DATA; False when more is needed."""
        body = self._body
        assert body is not None
        pending, self._data_in = self._data_in, []
        for data in pending:
            body.feed(data)
        if not body.decoder.done:
            return False
        self._reader.feed(body.decoder.trailing)  # pipelined commands after the dot
        self._body = None
        if body.too_large:
            self._reply_each(TOO_BIG)
            self._reset_transaction()
            return True
        self.state = State.READY
        self._waiting = Waiting.DELIVERY
        self._events.append(
            DeliverMessage(
                sender=self.sender or "",
                recipients=tuple(self.recipients),
                message=b"".join(body.chunks),
                helo=self.helo,
            )
        )
        return True

    # ----------------------------------------------------------------- answers

    def send(self, answer: object) -> None:
        """Answer the request the machine waits for (or ``Abort`` at any time)."""
        if isinstance(answer, Abort):
            self._events.clear()
            self.close_with(ABORT_STATUS[answer.reason], answer.reason)
        elif isinstance(answer, RecipientChecked) and self._waiting is Waiting.RECIPIENT:
            self._waiting = Waiting.NOTHING
            if answer.status.ok:
                self.recipients.append(self._pending_recipient)
                self._errors_in_row = 0
            self._reply(answer.status)
        elif isinstance(answer, DeliveryDone) and self._waiting is Waiting.DELIVERY:
            # RFC 2033 section 4.2: one reply per successful RCPT, so the count
            # is checked: a driver bug must not desynchronise the client.
            if len(answer.statuses) != len(self.recipients):
                raise ValueError(
                    f"{len(answer.statuses)} statuses for {len(self.recipients)} recipients"
                )
            self._waiting = Waiting.NOTHING
            for status in answer.statuses:
                self._reply(status)
            self._reset_transaction()
        else:
            raise RuntimeError(f"{answer!r} is no answer while waiting for {self._waiting.name}")

    def close_with(self, status: Status, reason: str) -> None:
        """Queue a final reply and close."""
        self._reply(status)
        self.state = State.CLOSED
        self._waiting = Waiting.NOTHING
        self._events.append(Close(reason))

    # --------------------------------------------------------------- plumbing

    def _reply(self, status: Status) -> None:
        self._events.append(Reply(status.line()))

    def _reply_each(self, status: Status) -> None:
        for _ in self.recipients:
            self._reply(status)

    def _reset_transaction(self) -> None:
        self.sender = None
        self.recipients = []
        if self.state is not State.GREETED:
            self.state = State.READY

    def _error(self, status: Status) -> None:
        """Reply with an error; at the limit of errors in a row, the reply is the 421 instead.

        One reply per command (RFC 5321 section 4.2 allows 421 to any command),
        so a pipelining client never reads a goodbye as the answer to its next command.
        """
        self._errors_in_row += 1
        if self._errors_in_row < self.policy.max_errors:
            self._reply(status)
        else:
            self.close_with(TOO_MANY_ERRORS, "too many errors")

    def _handle_line(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(Status(500, "5.5.2", "Invalid characters in command (UTF-8 expected)"))
            return
        verb, _, rest = text.partition(" ")
        entry = COMMANDS.get(verb.upper())
        if entry is None:
            self._error(UNKNOWN_COMMAND)
            return
        states, handler = entry
        if self.state not in states:
            self._error(BAD_SEQUENCE)
            return
        errors_before = self._errors_in_row
        handler(self, rest.strip(" "))
        if self._errors_in_row == errors_before:
            self._errors_in_row = 0

    # -------------------------------------------------------------- commands

    def _cmd_lhlo(self, rest: str) -> None:
        if not rest or " " in rest:
            self._error(Status(501, "5.5.4", "Syntax: LHLO hostname"))
            return
        self.helo = rest
        self.state = State.READY
        self._reset_transaction()
        lines = [self.policy.hostname, "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"]
        lines.append("SMTPUTF8")
        size = self.policy.max_message_size
        lines.append(f"SIZE {size}" if size else "SIZE")
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._events.append(Reply(text.encode()))

    def _cmd_helo(self, rest: str) -> None:
        self._error(USE_LHLO)

    def _cmd_mail(self, rest: str) -> None:
        if self.state is State.MAIL:
            self._error(Status(503, "5.5.1", "Nested MAIL command"))
            return
        parsed = _split_mail_argument(rest, "FROM:")
        path = _parse_path(parsed[0]) if parsed else None
        if parsed is None or path is None:
            self._error(SENDER_SYNTAX)
            return
        for param in parsed[1]:
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isdigit() and len(value) <= 20:
                # RFC 1870 section 6: refuse early when the declared size is too big.
                limit = self.policy.max_message_size
                if limit and int(value) > limit:
                    self._error(TOO_BIG)
                    return
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass  # RFC 6152: stored unchanged either way
            elif key == "SMTPUTF8" and not value:
                pass  # RFC 6531: UTF-8 addresses are accepted anyway
            else:
                self._error(BAD_PARAMETER)
                return
        self.sender = path
        self.recipients = []
        self.state = State.MAIL
        self._reply(SENDER_OK)

    def _cmd_rcpt(self, rest: str) -> None:
        parsed = _split_mail_argument(rest, "TO:")
        path = _parse_path(parsed[0]) if parsed else None
        if parsed is None or not path:
            self._error(RECIPIENT_SYNTAX)
            return
        if parsed[1]:
            self._error(BAD_PARAMETER)
            return
        if len(self.recipients) >= self.policy.max_recipients:
            self._reply(TOO_MANY_RECIPIENTS)
            return
        self._pending_recipient = path
        self._waiting = Waiting.RECIPIENT
        self._events.append(CheckRecipient(path))

    def _cmd_data(self, rest: str) -> None:
        if rest:
            self._error(Status(501, "5.5.4", "Syntax: DATA"))
            return
        if not self.recipients:
            # RFC 2033 section 4.2: DATA with no successful RCPT fails with 503.
            self._error(NO_VALID_RECIPIENTS)
            return
        self.state = State.DATA
        self._body = _Body(self.policy.max_message_size)
        self._data_in = [self._reader.take_buffer()]  # pipelined data after DATA (RFC 2920)
        self._reply(START_DATA)

    def _cmd_rset(self, rest: str) -> None:
        self._reset_transaction()
        self._reply(OK)

    def _cmd_noop(self, rest: str) -> None:
        self._reply(OK)

    def _cmd_vrfy(self, rest: str) -> None:
        # RFC 5321 section 3.5.3: 252 says "cannot verify" without enumerating users.
        self._reply(NO_VRFY)

    def _cmd_help(self, rest: str) -> None:
        self._reply(Status(214, "2.0.0", "LHLO MAIL RCPT DATA RSET NOOP VRFY QUIT"))

    def _cmd_quit(self, rest: str) -> None:
        self.close_with(BYE, "quit")


_ANY = frozenset({State.GREETED, State.READY, State.MAIL})
_SESSION = frozenset({State.READY, State.MAIL})

COMMANDS: dict[str, tuple[frozenset[State], Handler]] = {
    "LHLO": (_ANY, LmtpConnection._cmd_lhlo),
    "HELO": (_ANY, LmtpConnection._cmd_helo),
    "EHLO": (_ANY, LmtpConnection._cmd_helo),
    "MAIL": (_SESSION, LmtpConnection._cmd_mail),
    "RCPT": (frozenset({State.MAIL}), LmtpConnection._cmd_rcpt),
    "DATA": (frozenset({State.MAIL}), LmtpConnection._cmd_data),
    "RSET": (_ANY, LmtpConnection._cmd_rset),
    "NOOP": (_ANY, LmtpConnection._cmd_noop),
    "VRFY": (_ANY, LmtpConnection._cmd_vrfy),
    "HELP": (_ANY, LmtpConnection._cmd_help),
    "QUIT": (_ANY, LmtpConnection._cmd_quit),
}
"""Which command is allowed in which state, and its handler (DESIGN.md rule 2/3)."""

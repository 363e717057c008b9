"""The POP3 server state machine (RFC 1939, with RFC 2449, 2595, 5034, 6856), sans-IO.

It follows the contract of ``events`` (h11's shape): ``receive_data`` adds
bytes, ``next_event`` returns replies and requests, ``send`` answers a
request.  A RETR/TOP body is a state here (``Waiting.BODY``): the core asks
for each stored chunk and replies with its encoded form, so the driver can
never run ahead of it, and pipelined commands wait until ``EndOfMessage``.

The maildrop snapshot (UIDL and size per message) and the deletion marks live
here, so STAT, LIST, UIDL, DELE, RSET and NOOP need no I/O at all and the
rules around them (fixed message numbers, deleted messages invisible, marks
applied only at QUIT, RFC 1939 sections 4-6) are tested with byte strings.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from mailbag.protocol.capabilities import (
    Pop3Policy,
    capability_lines,
)
from mailbag.protocol.dots import MessageEncoder, encode_whole
from mailbag.protocol.events import (
    Abort,
    BodyChunk,
    BodyEnd,
    Close,
    CommitDone,
    EndOfMessage,
    Event,
    Login,
    LoginAccepted,
    LoginRefused,
    MessageFailed,
    MessageOpened,
    NeedBody,
    NeedData,
    Reply,
    SaslAbort,
    SaslChallenge,
    SaslContinue,
    SaslStart,
    SendMessage,
    TlsStarted,
)
from mailbag.protocol.languages import DEFAULT_LANGUAGE, translate
from mailbag.protocol.lines import LineReader, LineTooLong
from mailbag.protocol.pop3_commands import COMMANDS, Waiting
from mailbag.protocol.pop3_commands import State as State
from mailbag.protocol.sasl import (
    Cancelled,
    Challenge,
    Credentials,
    Invalid,
    SaslExchange,
    Step,
    ToDriver,
    challenge_line,
)
from mailbag.protocol.snapshot import Pop3Error, Snapshot

#: Which answers each waiting state takes (anything else is a driver bug).
ANSWERS: dict[Waiting, tuple[type, ...]] = {
    Waiting.LOGIN: (LoginAccepted, LoginRefused),
    Waiting.SASL: (LoginAccepted, LoginRefused, SaslChallenge),
    Waiting.MESSAGE: (MessageOpened, MessageFailed),
    Waiting.BODY: (BodyChunk, BodyEnd),
    Waiting.COMMIT: (CommitDone,),
    Waiting.TLS: (TlsStarted,),
}

#: ``ANSWERS`` keyed by the member's ``id``: looked up once per answer, and hashing an
#: Enum member runs ``Enum.__hash__`` in Python.
_ANSWERS_BY_ID = {id(waiting): types for waiting, types in ANSWERS.items()}

#: The driver's own last words, by ``Abort`` reason.
ABORT_TEXTS = {
    "timeout": "Autologout; idle for too long.",
    "shutdown": "[SYS/TEMP] Server shutting down, try again later.",
    "internal error": "[SYS/TEMP] Internal server error; closing connection.",
}


def ok(text: str = "") -> bytes:
    """Format a single-line positive reply."""
    return b"+OK " + text.encode() + b"\r\n" if text else b"+OK\r\n"


def err(text: str) -> bytes:
    """Format a single-line negative reply."""
    return b"-ERR " + text.encode() + b"\r\n"


def multiline(first: str, lines: Sequence[str]) -> bytes:
    """Format ``+OK first``, the lines, and the terminating dot (our lines never start with ".")."""
    body = "\r\n".join(lines) + "\r\n" if lines else ""
    return ok(first) + body.encode() + b".\r\n"


def _printable_keyword(raw: bytes) -> str:
    """Echo a command name back only when it is short, printable ASCII."""
    if raw and len(raw) <= 16 and all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode("ascii").upper()
    return ""


class Pop3Connection:
    """One POP3 conversation, from greeting to close, without any I/O."""

    def __init__(
        self,
        policy: Pop3Policy,
        *,
        timestamp: str,
        greeting: str = "mailbag POP3 server ready.",
        secure: bool = False,
        plaintext_allowed: bool = True,
    ) -> None:
        self.policy = policy
        self.timestamp = timestamp
        self.secure = secure
        self.plaintext_allowed = plaintext_allowed
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.utf8 = False
        #: RFC 6856 LANG: the language of response texts (English until LANG).
        self.language = DEFAULT_LANGUAGE
        self.pending_user: str | None = None
        self._reader = LineReader(max(policy.max_command_line, policy.max_sasl_line))
        self._events: deque[Event] = deque()
        self._waiting = Waiting.NOTHING
        self._errors_in_row = 0
        self._auth_failures = 0
        self.snapshot = Snapshot()
        self.login_caps: list[str] = []
        self.sasl: SaslExchange | None = None
        self._message: SendMessage | None = None
        self._encoder: MessageEncoder | None = None
        self._eof = False
        #: Commands received, by name (known commands only): for metrics.
        self.commands: Counter[str] = Counter()
        # RFC 1939 section 7: the greeting carries the APOP timestamp.
        self.reply(self.ok(f"{greeting} {timestamp}" if policy.apop else greeting))

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
            return
        self._reader.feed(data)

    def take_unprocessed(self) -> bytes:
        """Remove bytes received but not yet processed (plaintext pipelined after STLS)."""
        return self._reader.take_buffer()

    @property
    def waiting(self) -> bool:
        """True while the machine waits for an answer from the driver."""
        return self._waiting not in (Waiting.NOTHING, Waiting.SASL_LINE)

    def next_event(self) -> Event:
        """Return the next event; process one more input line if none is queued."""
        while not self._events:
            if self.state is State.CLOSED:
                return Close("closed")
            if self.waiting:
                raise RuntimeError(f"next_event while waiting for {self._waiting.name} answer")
            item = self._reader.next_line()
            if item is None:
                if self._eof:
                    self.state = State.CLOSED
                    return Close("client closed the connection")
                return NeedData()
            if isinstance(item, LineTooLong):
                if self._waiting is Waiting.SASL_LINE:
                    self.sasl_step(Invalid("Authentication line too long."))
                else:
                    self._error("Line too long.")
                continue
            self._handle_line(item.data)
        return self._events.popleft()

    # --------------------------------------------------------------- plumbing

    def reply(self, data: bytes) -> None:
        self._events.append(Reply(data))

    def ok(self, text: str = "") -> bytes:
        return ok(translate(text, self.language))

    def err(self, text: str) -> bytes:
        return err(translate(text, self.language))

    def multiline(self, first: str, lines: Sequence[str]) -> bytes:
        return multiline(translate(first, self.language), lines)

    def _error(self, text: str) -> None:
        """Reply ``-ERR``; at the limit of errors in a row, that one reply also says goodbye.

        RFC 1939: one response per command, so the closing notice is part of
        the reply to the command that reached ``max_errors``, never a second line.
        """
        self._errors_in_row += 1
        if self._errors_in_row < self.policy.max_errors:
            self.reply(self.err(text))
            return
        closing = translate("; too many errors, closing connection.", self.language)
        text = translate(text, self.language).rstrip(".。")
        self.close_with(err(text + closing), "too many errors")

    def close_with(self, data: bytes, reason: str) -> None:
        self.reply(data)
        self.state = State.CLOSED
        self._waiting = Waiting.NOTHING
        self._events.append(Close(reason))

    def _handle_line(self, line: bytes) -> None:
        if self._waiting is Waiting.SASL_LINE and self.sasl is not None:
            self.sasl_step(self.sasl.line(line))
            return
        keyword, _, rest = line.partition(b" ")
        name = keyword.upper()
        if len(line) + 2 > self.policy.max_command_line and name != b"AUTH":
            self._error("Line too long.")
            return
        entry = COMMANDS.get(name)
        self.commands[name.decode("ascii") if entry is not None else "unknown"] += 1
        if entry is None:
            shown = _printable_keyword(keyword)
            self._error(f"Unknown command: {shown}" if shown else "Unknown command.")
            return
        states, handler = entry
        if self.state not in states:
            self._error(f"{name.decode()} is not valid in the {self.state.value} state.")
            return
        args = rest.split() if name != b"PASS" else []
        errors_before = self._errors_in_row
        try:
            handler(self, args, rest)
        except Pop3Error as exc:
            self._error(str(exc))
        else:
            if self._errors_in_row == errors_before:
                self._errors_in_row = 0

    # --------------------------------------------- used by the command table

    def sasl_step(self, step: Step, *, first: bool = False) -> None:
        """Act on one step of the exchange's wire side (``protocol.sasl``)."""
        exchange = self.sasl
        assert exchange is not None
        if isinstance(step, ToDriver):
            self._waiting = Waiting.SASL
            if first:
                self._events.append(SaslStart(exchange.mechanism, step.data))
            else:
                self._events.append(SaslContinue(step.data or b""))
        elif isinstance(step, Challenge):
            self.reply(challenge_line(step.data))
            self._waiting = Waiting.SASL_LINE
        elif isinstance(step, Credentials):
            self.sasl = None
            login = Login(step.authcid, step.password, "PLAIN", step.authzid)
            self.request(login, Waiting.LOGIN)
        else:
            self.sasl = None
            self._waiting = Waiting.NOTHING
            if isinstance(step, Cancelled):
                self.reply(self.err("Authentication cancelled."))
            else:
                self._error(step.text)
            if not first and (exchange.in_session or isinstance(step, Cancelled)):
                self._events.append(SaslAbort())  # the session forgets its mechanism

    def current_caps(self) -> list[str]:
        return capability_lines(
            self.policy,
            authenticated=self.state is not State.AUTHORIZATION,
            secure=self.secure,
            plaintext_allowed=self.plaintext_allowed,
        )

    def request(self, event: Event, waiting: Waiting) -> None:
        """Emit a request event and wait for the driver's answer to it."""
        self._waiting = waiting
        if isinstance(event, SendMessage):
            self._message = event
        self._events.append(event)

    # ---------------------------------------------------------------- answers

    def send(self, answer: object) -> None:
        """Answer the request the machine waits for; the outcome comes out as events."""
        if isinstance(answer, Abort):
            self._events.clear()
            self.close_with(self.err(ABORT_TEXTS[answer.reason]), answer.reason)
            return
        if not isinstance(answer, _ANSWERS_BY_ID.get(id(self._waiting), ())):
            raise RuntimeError(f"{answer!r} is no answer while waiting for {self._waiting.name}")
        self._waiting = Waiting.NOTHING
        if type(answer) is MessageOpened:  # the one answer of every RETR first
            self._message_opened(answer.whole)
        elif isinstance(answer, BodyChunk):
            self._body_chunk(answer.data)
        elif isinstance(answer, BodyEnd):
            self._body_end()
        elif isinstance(answer, LoginAccepted):
            self._login_accepted(answer)
        elif isinstance(answer, LoginRefused):
            self._login_refused(answer.text)
        elif isinstance(answer, SaslChallenge):
            self._waiting = Waiting.SASL_LINE
            self.reply(challenge_line(answer.data))
        elif isinstance(answer, MessageOpened):
            self._message_opened(answer.whole)
        elif isinstance(answer, MessageFailed):
            self._message = None
            self.reply(self.err(answer.text))
        elif isinstance(answer, CommitDone):
            self._commit_done(answer)
        elif isinstance(answer, TlsStarted):
            # RFC 2595 section 4: forget everything from before TLS.
            self.secure = True
            self.plaintext_allowed = True
            self.pending_user = None
            self._reader.take_buffer()

    def _login_accepted(self, answer: LoginAccepted) -> None:
        """Enter TRANSACTION with this maildrop snapshot (message numbers now fixed)."""
        self.login_caps = [c for c in self.current_caps() if c != "STLS"]
        self.sasl = None
        self.state = State.TRANSACTION
        self.user = answer.user
        self.snapshot = Snapshot(answer.messages)
        self._errors_in_row = 0
        count, octets = self.snapshot.totals()
        self.reply(self.ok(f"Logged in, {count} messages ({octets} octets)."))

    def _login_refused(self, text: str) -> None:
        """Stay in AUTHORIZATION; close after too many failures on this connection."""
        self.sasl = None
        self._auth_failures += 1
        self.reply(self.err(text))
        if self._auth_failures >= self.policy.max_auth_failures:
            self.state = State.CLOSED
            self._events.append(Close("too many authentication failures"))

    def _message_opened(self, whole: bytes | None) -> None:
        """First line of RETR (with the size, as RFC 1939's example shows) or TOP; body next.

        With the ``whole`` message at hand, the body is encoded and ended at once.
        """
        request = self._message
        assert request is not None
        status = self.ok(f"{request.size} octets" if request.body_lines is None else "")
        if whole is not None:
            if request.body_lines is None:
                # One copy: the status line and the encoded parts joined once.
                self.reply(b"".join((status, *encode_whole(whole))))
            else:
                encoder = MessageEncoder(request.body_lines)
                self.reply(status + encoder.feed(whole) + encoder.finish())
            self._message = None
            self._events.append(EndOfMessage(request.msn, top=request.body_lines is not None))
            return
        encoder = MessageEncoder(request.body_lines)
        self.reply(status)
        self._encoder = encoder
        self._waiting = Waiting.BODY
        self._events.append(NeedBody())

    def _body_chunk(self, data: bytes) -> None:
        encoder = self._encoder
        assert encoder is not None
        encoded = encoder.feed(data)
        if encoded:
            self.reply(encoded)
        if encoder.done:  # TOP has all its lines: storage need not be read further
            self._body_end()
        else:
            self._waiting = Waiting.BODY
            self._events.append(NeedBody())

    def _body_end(self) -> None:
        encoder, request = self._encoder, self._message
        assert encoder is not None and request is not None
        self.reply(encoder.finish())
        self._encoder = self._message = None
        self._events.append(EndOfMessage(request.msn, top=request.body_lines is not None))

    def _commit_done(self, answer: CommitDone) -> None:
        """Answer QUIT after UPDATE; ``-ERR`` if any removal failed (RFC 1939 section 6)."""
        if answer.failed:
            text = answer.text or f"[SYS/TEMP] {answer.failed} messages could not be deleted."
            self.close_with(self.err(text), "quit")
            return
        count, _ = self.snapshot.totals()
        left = "maildrop empty" if count == 0 else f"{count} left"
        self.close_with(
            self.ok(f"mailbag signing off ({answer.removed} deleted, {left})."), "quit"
        )

"""The POP3 server state machine (RFC 1939, with RFC 2449, 2595, 5034, 6856), sans-IO.

Feed it bytes with ``receive_data``; pull events with ``next_event`` until it
returns ``NeedData``.  ``Reply`` events carry bytes to send; the other events
ask the driver for I/O, and the driver answers through the ``*_succeeded`` /
``*_failed`` / ``commit_finished`` methods, which return the reply bytes.

The maildrop snapshot (UIDL and size per message) and the deletion marks live
here, so STAT, LIST, UIDL, DELE, RSET and NOOP need no I/O at all and the
rules around them (fixed message numbers, deleted messages invisible, marks
applied only at QUIT, RFC 1939 sections 4-6) are tested with byte strings.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Protocol

from mailbag.protocol.capabilities import (
    PLAINTEXT_MECHANISMS,
    Pop3Policy,
    capability_lines,
    offered_mechanisms,
)
from mailbag.protocol.events import (
    ApopLogin,
    Close,
    Commit,
    Event,
    Login,
    NeedData,
    Reply,
    SaslAbort,
    SaslContinue,
    SaslStart,
    SendMessage,
    StartTls,
)
from mailbag.protocol.languages import DEFAULT_LANGUAGE, LANGUAGES, choose, translate
from mailbag.protocol.lines import LineReader, LineTooLong

#: TOP's line count is clamped to this; fetchmail sends ``TOP n 99999999`` for "everything".
MAX_TOP_LINES = 2**31 - 1
#: Longest message number we parse; anything longer is certainly out of range.
MAX_NUMBER_DIGITS = 10


class State(enum.Enum):
    """RFC 1939 section 3: the states of a POP3 session."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


class Waiting(enum.Enum):
    """What driver callback the machine waits for, if any."""

    NOTHING = enum.auto()
    LOGIN = enum.auto()
    SASL = enum.auto()  # a mechanism step from the driver
    SASL_LINE = enum.auto()  # a continuation line from the client
    MESSAGE = enum.auto()
    COMMIT = enum.auto()


class MessageListing(Protocol):
    """What the snapshot needs from storage's ``MessageInfo`` (structural, no import)."""

    @property
    def uid(self) -> str: ...

    @property
    def size(self) -> int: ...


class Pop3Error(Exception):
    """A command-level failure whose text goes to the client after ``-ERR``."""


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


def _decode_arg(raw: bytes) -> str:
    """Decode a textual argument; UTF-8 is accepted (RFC 6856), other bytes are not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Pop3Error("Invalid characters in argument (UTF-8 expected).") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise Pop3Error("Control characters are not allowed in arguments.")
    return text


def _printable_keyword(raw: bytes) -> str:
    """Echo a command name back only when it is short, printable ASCII."""
    if raw and len(raw) <= 16 and all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode("ascii").upper()
    return ""


Handler = Callable[["Pop3Connection", list[bytes], bytes], None]


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
        self.greeting_text = greeting
        self.secure = secure
        self.plaintext_allowed = plaintext_allowed
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.utf8 = False
        #: RFC 6856 LANG: the language of response texts (English until LANG).
        self.language = DEFAULT_LANGUAGE
        self._pending_user: str | None = None
        self._reader = LineReader(max(policy.max_command_line, policy.max_sasl_line))
        self._events: deque[Event] = deque()
        self._waiting = Waiting.NOTHING
        self._errors_in_row = 0
        self._auth_failures = 0
        self._uids: list[str] = []
        self._sizes: list[int] = []
        self._deleted: set[int] = set()  # 0-based idx
        self._login_caps: list[str] = []
        self._sasl_mechanism = ""
        self._pending_message: SendMessage | None = None
        self._eof = False
        #: Commands received, by name (known commands only): for metrics.
        self.commands: Counter[str] = Counter()

    # ------------------------------------------------------------------ input

    def greeting(self) -> bytes:
        """The first line the server sends, with the APOP timestamp (RFC 1939 section 7)."""
        text = self.greeting_text
        if self.policy.apop:
            text = f"{text} {self.timestamp}"
        return self._ok(text)

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
        """True while the machine waits for a driver callback."""
        return self._waiting not in (Waiting.NOTHING, Waiting.SASL_LINE)

    def next_event(self) -> Event:
        """Return the next event; process one more input line if none is queued."""
        while not self._events:
            if self.state is State.CLOSED:
                return Close("closed")
            if self.waiting:
                return NeedData()
            item = self._reader.next_line()
            if item is None:
                if self._eof:
                    self.state = State.CLOSED
                    return Close("client closed the connection")
                return NeedData()
            if isinstance(item, LineTooLong):
                if self._waiting is Waiting.SASL_LINE:
                    self._sasl_fail("Authentication line too long.")
                else:
                    self._error("Line too long.")
                continue
            self._handle_line(item.data)
        return self._events.popleft()

    # --------------------------------------------------------------- plumbing

    def _reply(self, data: bytes) -> None:
        self._events.append(Reply(data))

    def _ok(self, text: str = "") -> bytes:
        return ok(translate(text, self.language))

    def _err(self, text: str) -> bytes:
        return err(translate(text, self.language))

    def _multiline(self, first: str, lines: Sequence[str]) -> bytes:
        return multiline(translate(first, self.language), lines)

    def error_reply(self, text: str) -> bytes:
        """A ``-ERR`` line in the client's language (for the driver's own errors)."""
        return self._err(text)

    def _error(self, text: str) -> None:
        """Queue ``-ERR``; close the connection after too many errors in a row."""
        self._reply(self._err(text))
        self._errors_in_row += 1
        if self._errors_in_row >= self.policy.max_errors:
            self._close_with(
                self._err("Too many bad commands, closing connection."), "too many errors"
            )

    def _close_with(self, data: bytes, reason: str) -> None:
        self._reply(data)
        self.state = State.CLOSED
        self._events.append(Close(reason))

    def _handle_line(self, line: bytes) -> None:
        if self._waiting is Waiting.SASL_LINE:
            self._handle_sasl_line(line)
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

    # ------------------------------------------------------ argument parsing

    def _parse_msn(self, raw: bytes, *, allow_deleted: bool = False) -> int:
        """Parse a message number into a 0-based idx (one parser for every command)."""
        if not raw.isdigit() or len(raw) > MAX_NUMBER_DIGITS:
            shown = raw[:20].decode("ascii", "replace") if raw.isascii() else "?"
            raise Pop3Error(f"Invalid message number: {shown}")
        msn = int(raw)
        if msn < 1 or msn > len(self._uids):
            raise Pop3Error(f"There's no message {msn}.")
        idx = msn - 1
        if idx in self._deleted and not allow_deleted:
            raise Pop3Error(f"Message {msn} is deleted.")
        return idx

    @staticmethod
    def _want_args(args: list[bytes], low: int, high: int, usage: str) -> None:
        if not low <= len(args) <= high:
            raise Pop3Error(f"Syntax: {usage}")

    # ------------------------------------------------------ AUTHORIZATION

    def _plaintext_refused(self) -> None:
        raise Pop3Error(
            "[AUTH] Plaintext authentication disallowed on non-secure connections; "
            "use STLS or the POP3S port."
        )

    def _cmd_user(self, args: list[bytes], rest: bytes) -> None:
        if not self.plaintext_allowed:
            self._plaintext_refused()
        if not rest.strip():
            raise Pop3Error("Syntax: USER name")
        self._want_args(args, 1, 1, "USER name")
        self._pending_user = _decode_arg(args[0])
        self._reply(self._ok())

    def _cmd_pass(self, args: list[bytes], rest: bytes) -> None:
        if not self.plaintext_allowed:
            self._plaintext_refused()
        if self._pending_user is None:
            raise Pop3Error("No user name given; use USER first.")
        if not rest:
            raise Pop3Error("Syntax: PASS password")
        # RFC 1939 section 7: the password is the rest of the line; it may contain spaces.
        password = _decode_arg(rest)
        user, self._pending_user = self._pending_user, None
        self._start_login(Login(user=user, password=password, mechanism="USER"))

    def _cmd_apop(self, args: list[bytes], rest: bytes) -> None:
        self._pending_user = None
        self._want_args(args, 2, 2, "APOP name digest")
        digest = _decode_arg(args[1]).lower()
        if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            raise Pop3Error("[AUTH] Authentication failed.")
        self._start_login(
            ApopLogin(user=_decode_arg(args[0]), digest=digest, timestamp=self.timestamp)
        )

    def _cmd_auth(self, args: list[bytes], rest: bytes) -> None:
        self._pending_user = None
        mechanisms = offered_mechanisms(self.policy, plaintext_allowed=self.plaintext_allowed)
        if not args:
            # Old Outlook sends a bare AUTH and expects the list (pre-RFC 5034 behaviour).
            self._reply(self._multiline("", mechanisms))
            return
        self._want_args(args, 1, 2, "AUTH mechanism [initial-response]")
        mechanism = args[0].decode("ascii", "replace").upper()
        if mechanism not in mechanisms:
            if mechanism in PLAINTEXT_MECHANISMS and mechanism in self.policy.sasl_mechanisms:
                self._plaintext_refused()
            raise Pop3Error("Unsupported authentication mechanism.")
        initial: bytes | None = None
        if len(args) == 2:
            initial = self._b64decode(args[1])
            if initial is None:
                raise Pop3Error("Invalid base64 data in initial response.")
        self._sasl_mechanism = mechanism
        if mechanism == "PLAIN":
            if initial is None:
                self._sasl_challenge_now(b"")
            else:
                self._finish_plain(initial)
            return
        self._waiting = Waiting.SASL
        self._events.append(SaslStart(mechanism=mechanism, initial=initial))

    @staticmethod
    def _b64decode(raw: bytes) -> bytes | None:
        if raw == b"=":
            return b""
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None

    def _finish_plain(self, data: bytes) -> None:
        """RFC 4616: ``[authzid] NUL authcid NUL passwd``, all UTF-8."""
        parts = data.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            self._sasl_fail("Invalid PLAIN authentication data.")
            return
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            self._sasl_fail("Invalid PLAIN authentication data.")
            return
        self._waiting = Waiting.NOTHING
        self._start_login(
            Login(user=authcid, password=password, mechanism="PLAIN", authzid=authzid)
        )

    def _sasl_challenge_now(self, data: bytes) -> None:
        self._reply(b"+ " + base64.b64encode(data) + b"\r\n")
        self._waiting = Waiting.SASL_LINE

    def _handle_sasl_line(self, line: bytes) -> None:
        if len(line) + 2 > self.policy.max_sasl_line:
            self._sasl_fail("Authentication line too long.")
            return
        if line.strip() == b"*":
            self._waiting = Waiting.NOTHING
            self._sasl_mechanism = ""
            self._reply(self._err("Authentication cancelled."))
            self._events.append(SaslAbort())
            return
        data = self._b64decode(line.strip()) if line.strip() else b""
        if data is None:
            self._sasl_fail("Invalid base64 data in continued response.")
            return
        if self._sasl_mechanism == "PLAIN":
            self._finish_plain(data)
            return
        self._waiting = Waiting.SASL
        self._events.append(SaslContinue(data))

    def _sasl_fail(self, text: str) -> None:
        was_driver_mechanism = self._sasl_mechanism not in ("", "PLAIN")
        self._waiting = Waiting.NOTHING
        self._sasl_mechanism = ""
        self._error(text)
        if was_driver_mechanism:
            self._events.append(SaslAbort())

    def _cmd_stls(self, args: list[bytes], rest: bytes) -> None:
        if not self.policy.stls:
            raise Pop3Error("STLS is not available on this server.")
        if self.secure:
            raise Pop3Error("TLS is already active.")
        self._want_args(args, 0, 0, "STLS")
        # RFC 2595 section 4: nothing said before STLS survives it.
        self._pending_user = None
        self._reply(self._ok("Begin TLS negotiation now."))
        self._waiting = Waiting.NOTHING
        self._events.append(StartTls())

    def _cmd_utf8(self, args: list[bytes], rest: bytes) -> None:
        if not self.policy.utf8:
            raise Pop3Error("UTF8 is not available.")
        self._want_args(args, 0, 0, "UTF8")
        self.utf8 = True
        self._reply(self._ok("UTF8 enabled."))

    def _cmd_lang(self, args: list[bytes], rest: bytes) -> None:
        """RFC 6856 section 3: list languages, or choose one for response texts."""
        if not self.policy.languages:
            raise Pop3Error("Unknown command: LANG")
        self._want_args(args, 0, 1, "LANG [language]")
        if not args:
            lines = [f"{tag} {LANGUAGES.get(tag, tag)}" for tag in self.policy.languages]
            self._reply(self._multiline("Language listing follows.", lines))
            return
        chosen = choose(args[0].decode("ascii", "replace"))
        if chosen is None or chosen not in self.policy.languages:
            raise Pop3Error("Invalid language.")
        self.language = chosen
        self._reply(self._ok(f"{chosen} " + translate("Language changed to English.", chosen)))

    def _cmd_capa(self, args: list[bytes], rest: bytes) -> None:
        # RFC 2449 section 5: after login, still announce what was offered before it.
        lines = self._login_caps if self.state is State.TRANSACTION else self._current_caps()
        self._reply(self._multiline("Capability list follows.", lines))

    def _current_caps(self) -> list[str]:
        return capability_lines(
            self.policy,
            authenticated=self.state is not State.AUTHORIZATION,
            secure=self.secure,
            plaintext_allowed=self.plaintext_allowed,
        )

    def _cmd_quit(self, args: list[bytes], rest: bytes) -> None:
        if self.state is State.AUTHORIZATION:
            self._close_with(self._ok("mailbag signing off."), "quit")
            return
        # RFC 1939 section 6: QUIT from TRANSACTION enters UPDATE; only now is anything removed.
        self.state = State.UPDATE
        self._waiting = Waiting.COMMIT
        uids = tuple(self._uids[i] for i in sorted(self._deleted))
        self._events.append(Commit(uids))

    def _start_login(self, event: Login | ApopLogin) -> None:
        self._waiting = Waiting.LOGIN
        self._events.append(event)

    # ------------------------------------------------------- TRANSACTION

    def _cmd_stat(self, args: list[bytes], rest: bytes) -> None:
        self._want_args(args, 0, 0, "STAT")
        count, octets = self.totals()
        self._reply(self._ok(f"{count} {octets}"))

    def totals(self) -> tuple[int, int]:
        """Messages and octets not marked deleted."""
        if not self._deleted:  # the usual case; 100,000 messages make the filter show
            return len(self._sizes), sum(self._sizes)
        live = [s for i, s in enumerate(self._sizes) if i not in self._deleted]
        return len(live), sum(live)

    def _cmd_list(self, args: list[bytes], rest: bytes) -> None:
        self._scan_listing(args, "LIST", lambda idx: str(self._sizes[idx]))

    def _cmd_uidl(self, args: list[bytes], rest: bytes) -> None:
        self._scan_listing(args, "UIDL", lambda idx: self._uids[idx])

    def _scan_listing(self, args: list[bytes], name: str, value: Callable[[int], str]) -> None:
        self._want_args(args, 0, 1, f"{name} [message]")
        if args:
            idx = self._parse_msn(args[0])
            self._reply(self._ok(f"{idx + 1} {value(idx)}"))
            return
        deleted = self._deleted
        if deleted:
            lines = [f"{i + 1} {value(i)}" for i in range(len(self._uids)) if i not in deleted]
        else:  # no per-line call and no filter: a 100,000-line UIDL is one fast pass
            column = self._sizes if name == "LIST" else self._uids
            lines = [f"{i} {v}" for i, v in enumerate(column, 1)]
        if name == "LIST":
            count, octets = self.totals()
            first = f"{count} messages ({octets} octets)"
        else:
            first = ""
        self._reply(self._multiline(first, lines))

    def _cmd_retr(self, args: list[bytes], rest: bytes) -> None:
        self._want_args(args, 1, 1, "RETR message")
        idx = self._parse_msn(args[0])
        self._send_message(SendMessage(idx + 1, self._uids[idx], self._sizes[idx]))

    def _cmd_top(self, args: list[bytes], rest: bytes) -> None:
        # `top 1` without a line count, as typed in the seed's telnet session, means `top 1 0`.
        self._want_args(args, 1, 2, "TOP message lines")
        idx = self._parse_msn(args[0])
        lines = 0
        if len(args) == 2:
            if not args[1].isdigit():
                raise Pop3Error("Invalid number of lines: must be 0 or more.")
            lines = min(int(args[1][:12]), MAX_TOP_LINES)
        self._send_message(SendMessage(idx + 1, self._uids[idx], self._sizes[idx], lines))

    def _send_message(self, request: SendMessage) -> None:
        self._waiting = Waiting.MESSAGE
        self._pending_message = request
        self._events.append(request)

    def _cmd_dele(self, args: list[bytes], rest: bytes) -> None:
        self._want_args(args, 1, 1, "DELE message")
        idx = self._parse_msn(args[0])
        self._deleted.add(idx)
        self._reply(self._ok(f"Message {idx + 1} marked to be deleted."))

    def _cmd_rset(self, args: list[bytes], rest: bytes) -> None:
        self._want_args(args, 0, 0, "RSET")
        self._deleted.clear()
        count, octets = self.totals()
        self._reply(self._ok(f"{count} messages ({octets} octets)."))

    def _cmd_noop(self, args: list[bytes], rest: bytes) -> None:
        self._want_args(args, 0, 0, "NOOP")
        self._reply(self._ok())

    # ------------------------------------------------------ driver callbacks

    def _expect(self, *waiting: Waiting) -> None:
        if self._waiting not in waiting:
            raise RuntimeError(f"callback not expected while waiting for {self._waiting.name}")

    def login_succeeded(self, user: str, messages: Sequence[MessageListing]) -> bytes:
        """Enter TRANSACTION with this maildrop snapshot (message numbers now fixed)."""
        self._expect(Waiting.LOGIN, Waiting.SASL)
        self._login_caps = self._current_caps()
        self._login_caps = [c for c in self._login_caps if c != "STLS"]
        self._waiting = Waiting.NOTHING
        self._sasl_mechanism = ""
        self.state = State.TRANSACTION
        self.user = user
        self._uids = [m.uid for m in messages]
        self._sizes = [m.size for m in messages]
        self._deleted = set()
        self._errors_in_row = 0
        count, octets = self.totals()
        return self._ok(f"Logged in, {count} messages ({octets} octets).")

    def login_failed(self, text: str = "[AUTH] Authentication failed.") -> bytes:
        """Stay in AUTHORIZATION; close after too many failures on this connection."""
        self._expect(Waiting.LOGIN, Waiting.SASL)
        self._waiting = Waiting.NOTHING
        self._sasl_mechanism = ""
        self._auth_failures += 1
        if self._auth_failures >= self.policy.max_auth_failures:
            self.state = State.CLOSED
            self._events.append(Close("too many authentication failures"))
        return self._err(text)

    def sasl_challenge(self, data: bytes) -> bytes:
        """Send a SASL challenge (``+ base64``) and wait for the client's response line."""
        self._expect(Waiting.SASL)
        self._waiting = Waiting.SASL_LINE
        return b"+ " + base64.b64encode(data) + b"\r\n"

    def message_started(self) -> bytes:
        """First line of RETR (with the size, as RFC 1939's example shows) or TOP.

        The driver calls this once it knows the message is readable, then
        streams the body through ``lines.MessageEncoder``.
        """
        self._expect(Waiting.MESSAGE)
        self._waiting = Waiting.NOTHING
        request, self._pending_message = self._pending_message, None
        if request is not None and request.body_lines is None:
            return self._ok(f"{request.size} octets")
        return self._ok()

    def message_failed(self, text: str) -> bytes:
        """The message could not be read before anything was sent."""
        self._expect(Waiting.MESSAGE)
        self._waiting = Waiting.NOTHING
        self._pending_message = None
        return self._err(text)

    def commit_finished(self, removed: int, failed: int, text: str = "") -> bytes:
        """Answer QUIT after UPDATE; ``-ERR`` if any removal failed (RFC 1939 section 6)."""
        self._expect(Waiting.COMMIT)
        self._waiting = Waiting.NOTHING
        self.state = State.CLOSED
        self._events.append(Close("quit"))
        if failed:
            return self._err(text or f"[SYS/TEMP] {failed} messages could not be deleted.")
        count, _ = self.totals()
        left = "maildrop empty" if count == 0 else f"{count} left"
        return self._ok(f"mailbag signing off ({removed} deleted, {left}).")

    def tls_started(self) -> None:
        """TLS is up: forget everything from before (RFC 2595 section 4)."""
        self.secure = True
        self._pending_user = None
        self._reader.take_buffer()



_AUTH = frozenset({State.AUTHORIZATION})
_TRANS = frozenset({State.TRANSACTION})
_BOTH = _AUTH | _TRANS

#: The command table (DESIGN.md rule 3): keyword -> (states where valid, handler).
COMMANDS: dict[bytes, tuple[frozenset[State], Handler]] = {
    b"USER": (_AUTH, Pop3Connection._cmd_user),
    b"PASS": (_AUTH, Pop3Connection._cmd_pass),
    b"APOP": (_AUTH, Pop3Connection._cmd_apop),
    b"AUTH": (_AUTH, Pop3Connection._cmd_auth),
    b"STLS": (_AUTH, Pop3Connection._cmd_stls),
    b"UTF8": (_AUTH, Pop3Connection._cmd_utf8),
    b"CAPA": (_BOTH, Pop3Connection._cmd_capa),
    b"LANG": (_BOTH, Pop3Connection._cmd_lang),
    b"QUIT": (_BOTH, Pop3Connection._cmd_quit),
    b"STAT": (_TRANS, Pop3Connection._cmd_stat),
    b"LIST": (_TRANS, Pop3Connection._cmd_list),
    b"UIDL": (_TRANS, Pop3Connection._cmd_uidl),
    b"RETR": (_TRANS, Pop3Connection._cmd_retr),
    b"TOP": (_TRANS, Pop3Connection._cmd_top),
    b"DELE": (_TRANS, Pop3Connection._cmd_dele),
    b"RSET": (_TRANS, Pop3Connection._cmd_rset),
    b"NOOP": (_TRANS, Pop3Connection._cmd_noop),
}

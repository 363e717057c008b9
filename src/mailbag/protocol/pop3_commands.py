"""The POP3 command table and its handlers (DESIGN.md rule 3; Dovecot's pop3-commands.c).

One function per command, each given the connection, the split arguments
and the raw rest of the line.  A handler replies through the connection or
raises ``Pop3Error`` (whose text goes after ``-ERR``); commands that need I/O
emit a request event and the connection waits for the driver's answer.  Which
command is valid in which state is data: the ``COMMANDS`` table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

from mailbag.protocol.capabilities import PLAINTEXT_MECHANISMS, offered_mechanisms
from mailbag.protocol.events import ApopLogin, Commit, Login, SendMessage, StartTls
from mailbag.protocol.languages import LANGUAGES, choose, translate
from mailbag.protocol.sasl import SaslExchange
from mailbag.protocol.snapshot import Pop3Error

if TYPE_CHECKING:
    from mailbag.protocol.pop3 import Pop3Connection

#: TOP's line count is clamped to this; fetchmail sends ``TOP n 99999999`` for "everything".
MAX_TOP_LINES = 2**31 - 1


class State(enum.Enum):
    """RFC 1939 section 3: the states of a POP3 session."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


class Waiting(enum.Enum):
    """What the machine waits for, if anything: an answer from the driver, or a SASL line."""

    NOTHING = enum.auto()
    LOGIN = enum.auto()
    SASL = enum.auto()  # a mechanism step from the driver
    SASL_LINE = enum.auto()  # a continuation line from the client
    MESSAGE = enum.auto()  # MessageOpened / MessageFailed
    BODY = enum.auto()  # BodyChunk / BodyEnd, after NeedBody
    COMMIT = enum.auto()
    TLS = enum.auto()


Handler = Callable[["Pop3Connection", list[bytes], bytes], None]


def decode_arg(raw: bytes) -> str:
    """Decode a textual argument; UTF-8 is accepted (RFC 6856), other bytes are not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Pop3Error("Invalid characters in argument (UTF-8 expected).") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise Pop3Error("Control characters are not allowed in arguments.")
    return text


def _want_args(args: list[bytes], low: int, high: int, usage: str) -> None:
    if not low <= len(args) <= high:
        raise Pop3Error(f"Syntax: {usage}")


# ------------------------------------------------------ AUTHORIZATION


def _plaintext_refused() -> None:
    raise Pop3Error(
        "[AUTH] Plaintext authentication disallowed on non-secure connections; "
        "use STLS or the POP3S port."
    )


def _user(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    if not conn.plaintext_allowed:
        _plaintext_refused()
    if not rest.strip():
        raise Pop3Error("Syntax: USER name")
    _want_args(args, 1, 1, "USER name")
    conn.pending_user = decode_arg(args[0])
    conn.reply(conn.ok())


def _pass(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    if not conn.plaintext_allowed:
        _plaintext_refused()
    if conn.pending_user is None:
        raise Pop3Error("No user name given; use USER first.")
    if not rest:
        raise Pop3Error("Syntax: PASS password")
    # RFC 1939 section 7: the password is the rest of the line; it may contain spaces.
    password = decode_arg(rest)
    user, conn.pending_user = conn.pending_user, None
    conn.request(Login(user=user, password=password, mechanism="USER"), Waiting.LOGIN)


def _apop(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    conn.pending_user = None
    _want_args(args, 2, 2, "APOP name digest")
    digest = decode_arg(args[1]).lower()
    if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        raise Pop3Error("[AUTH] Authentication failed.")
    login = ApopLogin(user=decode_arg(args[0]), digest=digest, timestamp=conn.timestamp)
    conn.request(login, Waiting.LOGIN)


def _auth(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    conn.pending_user = None
    mechanisms = offered_mechanisms(conn.policy, plaintext_allowed=conn.plaintext_allowed)
    if not args:
        # Old Outlook sends a bare AUTH and expects the list (pre-RFC 5034 behaviour).
        conn.reply(conn.multiline("", mechanisms))
        return
    _want_args(args, 1, 2, "AUTH mechanism [initial-response]")
    mechanism = args[0].decode("ascii", "replace").upper()
    if mechanism not in mechanisms:
        if mechanism in PLAINTEXT_MECHANISMS and mechanism in conn.policy.sasl_mechanisms:
            _plaintext_refused()
        raise Pop3Error("Unsupported authentication mechanism.")
    conn.sasl = SaslExchange(mechanism, conn.policy.max_sasl_line)
    conn.sasl_step(conn.sasl.start(args[1] if len(args) == 2 else None), first=True)


def _stls(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    if not conn.policy.stls:
        raise Pop3Error("STLS is not available on this server.")
    if conn.secure:
        raise Pop3Error("TLS is already active.")
    _want_args(args, 0, 0, "STLS")
    # RFC 2595 section 4: nothing said before STLS survives it.
    conn.pending_user = None
    conn.reply(conn.ok("Begin TLS negotiation now."))
    conn.request(StartTls(), Waiting.TLS)


def _utf8(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    if not conn.policy.utf8:
        raise Pop3Error("UTF8 is not available.")
    _want_args(args, 0, 0, "UTF8")
    conn.utf8 = True
    conn.reply(conn.ok("UTF8 enabled."))


def _lang(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    """RFC 6856 section 3: list languages, or choose one for response texts."""
    if not conn.policy.languages:
        raise Pop3Error("Unknown command: LANG")
    _want_args(args, 0, 1, "LANG [language]")
    if not args:
        lines = [f"{tag} {LANGUAGES.get(tag, tag)}" for tag in conn.policy.languages]
        conn.reply(conn.multiline("Language listing follows.", lines))
        return
    chosen = choose(args[0].decode("ascii", "replace"))
    if chosen is None or chosen not in conn.policy.languages:
        raise Pop3Error("Invalid language.")
    conn.language = chosen
    conn.reply(conn.ok(f"{chosen} " + translate("Language changed to English.", chosen)))


def _capa(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    # RFC 2449 section 5: after login, still announce what was offered before it.
    lines = conn.login_caps if conn.state is State.TRANSACTION else conn.current_caps()
    conn.reply(conn.multiline("Capability list follows.", lines))


def _quit(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    if conn.state is State.AUTHORIZATION:
        conn.close_with(conn.ok("mailbag signing off."), "quit")
        return
    # RFC 1939 section 6: QUIT from TRANSACTION enters UPDATE; only now is anything removed.
    conn.state = State.UPDATE
    conn.request(Commit(conn.snapshot.marked_uids()), Waiting.COMMIT)


# ------------------------------------------------------- TRANSACTION


def _stat(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    _want_args(args, 0, 0, "STAT")
    count, octets = conn.snapshot.totals()
    conn.reply(conn.ok(f"{count} {octets}"))


def _list(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    _want_args(args, 0, 1, "LIST [message]")
    snapshot = conn.snapshot
    if args:
        idx = snapshot.parse_msn(args[0])
        conn.reply(conn.ok(f"{idx + 1} {snapshot.sizes[idx]}"))
        return
    count, octets = snapshot.totals()
    first = f"{count} messages ({octets} octets)"
    conn.reply(conn.multiline(first, snapshot.listing(snapshot.sizes)))


def _uidl(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    _want_args(args, 0, 1, "UIDL [message]")
    snapshot = conn.snapshot
    if args:
        idx = snapshot.parse_msn(args[0])
        conn.reply(conn.ok(f"{idx + 1} {snapshot.uids[idx]}"))
        return
    conn.reply(conn.multiline("", snapshot.listing(snapshot.uids)))


def _retr(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    _want_args(args, 1, 1, "RETR message")
    idx = conn.snapshot.parse_msn(args[0])
    conn.request(SendMessage(idx + 1, *_listing(conn, idx)), Waiting.MESSAGE)


def _top(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    # `top 1` without a line count, as typed in the seed's telnet session, means `top 1 0`.
    _want_args(args, 1, 2, "TOP message lines")
    idx = conn.snapshot.parse_msn(args[0])
    lines = 0
    if len(args) == 2:
        if not args[1].isdigit():
            raise Pop3Error("Invalid number of lines: must be 0 or more.")
        lines = min(int(args[1][:12]), MAX_TOP_LINES)
    conn.request(SendMessage(idx + 1, *_listing(conn, idx), lines), Waiting.MESSAGE)


def _listing(conn: Pop3Connection, idx: int) -> tuple[str, int]:
    return conn.snapshot.uids[idx], conn.snapshot.sizes[idx]


def _dele(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    _want_args(args, 1, 1, "DELE message")
    idx = conn.snapshot.parse_msn(args[0])
    conn.snapshot.deleted.add(idx)
    conn.reply(conn.ok(f"Message {idx + 1} marked to be deleted."))


def _rset(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    _want_args(args, 0, 0, "RSET")
    conn.snapshot.deleted.clear()
    count, octets = conn.snapshot.totals()
    conn.reply(conn.ok(f"{count} messages ({octets} octets)."))


def _noop(conn: Pop3Connection, args: list[bytes], rest: bytes) -> None:
    _want_args(args, 0, 0, "NOOP")
    conn.reply(conn.ok())


# Tuples, not frozensets: membership then compares by identity, where a set would
# call ``Enum.__hash__`` (Python code) once per command.
_AUTH = (State.AUTHORIZATION,)
_TRANS = (State.TRANSACTION,)
_BOTH = (State.AUTHORIZATION, State.TRANSACTION)


#: The command table (DESIGN.md rule 3): keyword -> (states where valid, handler).
COMMANDS: dict[bytes, tuple[tuple[State, ...], Handler]] = {
    b"USER": (_AUTH, _user),
    b"PASS": (_AUTH, _pass),
    b"APOP": (_AUTH, _apop),
    b"AUTH": (_AUTH, _auth),
    b"STLS": (_AUTH, _stls),
    b"UTF8": (_AUTH, _utf8),
    b"CAPA": (_BOTH, _capa),
    b"LANG": (_BOTH, _lang),
    b"QUIT": (_BOTH, _quit),
    b"STAT": (_TRANS, _stat),
    b"LIST": (_TRANS, _list),
    b"UIDL": (_TRANS, _uidl),
    b"RETR": (_TRANS, _retr),
    b"TOP": (_TRANS, _top),
    b"DELE": (_TRANS, _dele),
    b"RSET": (_TRANS, _rset),
    b"NOOP": (_TRANS, _noop),
}

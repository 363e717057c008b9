"""The POP3 state machine, driven with plain byte strings (no sockets, no event loop).

Test names read ``test_<command>_<condition>``; RFC clauses are cited where a
test proves one (see docs/rfc-compliance.md).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest

from mailbag.protocol.capabilities import Pop3Policy
from mailbag.protocol.events import (
    ApopLogin,
    BodyChunk,
    BodyEnd,
    Close,
    Commit,
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
    SaslStart,
    SendMessage,
    StartTls,
    TlsStarted,
)
from mailbag.protocol.pop3 import Pop3Connection, State


@dataclass(frozen=True)
class Msg:
    uid: str
    size: int


SNAPSHOT = [Msg("uid-a", 100), Msg("uid-b", 200), Msg("uid-c", 300)]


def make(**kwargs: object) -> Pop3Connection:
    """A new connection whose greeting (always its first event) was taken."""
    policy = kwargs.pop("policy", Pop3Policy())
    conn = Pop3Connection(policy, timestamp="<1.2@test>", **kwargs)  # type: ignore[arg-type]
    greeting = conn.next_event()
    assert isinstance(greeting, Reply) and greeting.data.startswith(b"+OK ")
    return conn


def drive(conn: Pop3Connection, data: bytes) -> list[Event]:
    """Feed bytes (none: just run); return every event until the machine needs data or waits."""
    if data:
        conn.receive_data(data)
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)
        if not isinstance(event, Reply):
            return events


def replies(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Reply))


def answer(conn: Pop3Connection, reply: object) -> bytes:
    """Send the driver's answer; return the replies it produces."""
    conn.send(reply)
    return replies(drive(conn, b""))


def logged_in(messages: list[Msg] | None = None) -> Pop3Connection:
    conn = make()
    events = drive(conn, b"USER demo\r\nPASS demo\r\n")
    assert isinstance(events[-1], Login)
    answer(conn, LoginAccepted("demo", messages if messages is not None else SNAPSHOT))
    return conn


def test_greeting_carries_apop_timestamp() -> None:
    # RFC 1939 section 7: the greeting includes a timestamp of the form <...@...>.
    conn = Pop3Connection(Pop3Policy(), timestamp="<1.2@test>")
    assert conn.next_event() == Reply(b"+OK mailbag POP3 server ready. <1.2@test>\r\n")


def test_user_pass_emits_login_with_whole_password_line() -> None:
    # RFC 1939 section 7: the PASS argument may contain spaces; it is the rest of the line.
    conn = make()
    events = drive(conn, b"user demo\r\npass  two words \r\n")
    assert replies(events) == b"+OK\r\n"
    login = events[-1]
    assert isinstance(login, Login)
    assert login.user == "demo" and login.password == " two words "


def test_pass_without_user_is_error() -> None:
    assert drive(make(), b"PASS x\r\n") == [Reply(b"-ERR No user name given; use USER first.\r\n")]


def test_user_without_argument_is_error() -> None:
    assert replies(drive(make(), b"USER\r\n")).startswith(b"-ERR Syntax: USER")


def test_keywords_case_insensitive_and_bare_lf_accepted() -> None:
    # RFC 1939 section 3: keywords are case-insensitive.  Bare LF is tolerated.
    conn = logged_in()
    assert replies(drive(conn, b"sTaT\n")) == b"+OK 3 600\r\n"


def test_login_succeeded_enters_transaction() -> None:
    conn = make()
    drive(conn, b"USER demo\r\nPASS demo\r\n")
    reply = answer(conn, LoginAccepted("demo", SNAPSHOT))
    assert reply == b"+OK Logged in, 3 messages (600 octets).\r\n"
    assert conn.state is State.TRANSACTION


def test_login_failed_stays_in_authorization_with_auth_code() -> None:
    # RFC 3206 section 4: [AUTH] marks a credentials problem.
    conn = make()
    drive(conn, b"USER demo\r\nPASS bad\r\n")
    assert answer(conn, LoginRefused()) == b"-ERR [AUTH] Authentication failed.\r\n"
    assert conn.state is State.AUTHORIZATION
    assert replies(drive(conn, b"STAT\r\n")).startswith(b"-ERR STAT is not valid")


def test_login_failed_closes_after_limit() -> None:
    conn = make(policy=Pop3Policy(max_auth_failures=2))
    for _ in range(2):
        drive(conn, b"USER a\r\nPASS b\r\n")
        conn.send(LoginRefused())
    assert conn.next_event() == Reply(b"-ERR [AUTH] Authentication failed.\r\n")
    assert isinstance(conn.next_event(), Close)


def test_stat_counts_octets_excluding_deleted() -> None:
    conn = logged_in()
    assert replies(drive(conn, b"DELE 2\r\nSTAT\r\n")) == (
        b"+OK Message 2 marked to be deleted.\r\n+OK 2 400\r\n"
    )


def test_list_multiline_excludes_deleted() -> None:
    # RFC 1939 section 5: deleted messages are not listed.
    conn = logged_in()
    out = replies(drive(conn, b"DELE 1\r\nLIST\r\n"))
    assert out.endswith(b"+OK 2 messages (500 octets)\r\n2 200\r\n3 300\r\n.\r\n")


def test_list_single_message() -> None:
    assert replies(drive(logged_in(), b"LIST 3\r\n")) == b"+OK 3 300\r\n"


def test_list_deleted_message_is_error() -> None:
    conn = logged_in()
    assert replies(drive(conn, b"DELE 1\r\nLIST 1\r\n")).endswith(b"-ERR Message 1 is deleted.\r\n")


@pytest.mark.parametrize(
    ("arg", "text"),
    [
        (b"0", b"-ERR There's no message 0.\r\n"),
        (b"4", b"-ERR There's no message 4.\r\n"),
        (b"-1", b"-ERR Invalid message number: -1\r\n"),
        (b"abc", b"-ERR Invalid message number: abc\r\n"),
        (b"99999999999999999999", b"-ERR Invalid message number: 99999999999999999999\r\n"),
        (b"+1", b"-ERR Invalid message number: +1\r\n"),
    ],
)
def test_retr_bad_message_number(arg: bytes, text: bytes) -> None:
    assert replies(drive(logged_in(), b"RETR " + arg + b"\r\n")) == text


def test_retr_missing_argument() -> None:
    assert replies(drive(logged_in(), b"RETR\r\n")) == b"-ERR Syntax: RETR message\r\n"


class Columns(list[object]):
    """A snapshot that offers its columns, as storage's ``MessageList`` does.

    Its items have no ``uid``/``size``: only the columns can be used.
    """

    def __init__(self, messages: list[Msg]) -> None:
        super().__init__(object() for _ in messages)
        self.uids = [m.uid for m in messages]
        self.sizes = [m.size for m in messages]


def test_a_snapshot_given_as_columns_lists_the_same() -> None:
    commands = b"STAT\r\nLIST\r\nUIDL\r\nDELE 2\r\nUIDL\r\nLIST 3\r\n"
    expected = replies(drive(logged_in(), commands))
    columns = Columns(SNAPSHOT)
    assert replies(drive(logged_in(columns), commands)) == expected  # type: ignore[arg-type]


def test_uidl_lists_stable_ids() -> None:
    out = replies(drive(logged_in(), b"UIDL\r\nUIDL 2\r\n"))
    assert out == b"+OK\r\n1 uid-a\r\n2 uid-b\r\n3 uid-c\r\n.\r\n+OK 2 uid-b\r\n"


def test_retr_emits_send_message_then_size_line() -> None:
    conn = logged_in()
    events = drive(conn, b"RETR 2\r\n")
    assert events == [SendMessage(2, "uid-b", 200, None)]
    assert answer(conn, MessageOpened()) == b"+OK 200 octets\r\n"


@pytest.mark.parametrize("body_lines", [None, 0, 1])
def test_a_whole_message_answer_gives_the_same_bytes_as_chunks(body_lines: int | None) -> None:
    """``MessageOpened(whole)``: status, encoded body and terminator in one reply, no chunks."""
    stored = b"Subject: x\n\n.dot first\nsecond\n.\nlast"
    command = b"RETR 2\r\n" if body_lines is None else b"TOP 2 %d\r\n" % body_lines
    streamed = logged_in()
    drive(streamed, command)
    streamed.send(MessageOpened())
    out = b""
    for answer_ in (BodyChunk(stored[:7]), BodyChunk(stored[7:]), BodyEnd(), None):
        while not isinstance(event := streamed.next_event(), NeedBody | EndOfMessage):
            assert isinstance(event, Reply)
            out += event.data
        if isinstance(event, EndOfMessage):
            break
        streamed.send(answer_)
    whole = logged_in()
    drive(whole, command)
    whole.send(MessageOpened(stored))
    reply = whole.next_event()
    assert isinstance(reply, Reply) and reply.data == out
    assert whole.next_event() == EndOfMessage(2, top=body_lines is not None)
    assert isinstance(whole.next_event(), NeedData)  # ready for the next command


def test_top_without_line_count_means_zero() -> None:
    # Friendly to the seed's hand-typed `top 1`.
    events = drive(logged_in(), b"top 1\r\n")
    assert events == [SendMessage(1, "uid-a", 100, 0)]


def test_top_huge_line_count_is_clamped() -> None:
    # fetchmail sends TOP n 99999999 to mean "the whole message".
    events = drive(logged_in(), b"TOP 1 99999999999999999999\r\n")
    assert isinstance(events[0], SendMessage)
    assert events[0].body_lines == 2**31 - 1


def test_top_negative_lines_is_error() -> None:
    assert replies(drive(logged_in(), b"TOP 1 -1\r\n")).startswith(b"-ERR Invalid number of lines")


def test_commands_pipelined_wait_behind_io() -> None:
    # RFC 2449 PIPELINING: replies come back in order even when one needs I/O.
    conn = logged_in()
    events = drive(conn, b"STAT\r\nRETR 1\r\nNOOP\r\n")
    assert events[-1] == SendMessage(1, "uid-a", 100, None)
    with pytest.raises(RuntimeError):  # the driver must answer before asking for more
        conn.next_event()
    conn.send(MessageOpened())
    assert conn.next_event() == Reply(b"+OK 100 octets\r\n")
    assert conn.next_event() == NeedBody()
    conn.send(BodyEnd())
    assert conn.next_event() == Reply(b".\r\n")
    assert conn.next_event() == EndOfMessage(1, top=False)
    assert replies(drive(conn, b"")) == b"+OK\r\n"


def test_dele_then_rset_undeletes() -> None:
    conn = logged_in()
    out = replies(drive(conn, b"DELE 1\r\nDELE 2\r\nRSET\r\nSTAT\r\n"))
    assert out.endswith(b"+OK 3 messages (600 octets).\r\n+OK 3 600\r\n")


def test_quit_in_transaction_commits_only_marked() -> None:
    # RFC 1939 section 6: QUIT from TRANSACTION enters UPDATE and removes marked messages.
    conn = logged_in()
    events = drive(conn, b"DELE 3\r\nDELE 1\r\nQUIT\r\n")
    assert events[-1] == Commit(("uid-a", "uid-c"))
    assert conn.state is State.UPDATE
    conn.send(CommitDone(2, 0))
    assert conn.next_event() == Reply(b"+OK mailbag signing off (2 deleted, 1 left).\r\n")
    assert isinstance(conn.next_event(), Close)


def test_rset_then_quit_deletes_nothing() -> None:
    # getmail's abort path.
    conn = logged_in()
    events = drive(conn, b"DELE 1\r\nRSET\r\nQUIT\r\n")
    assert events[-1] == Commit(())


def test_quit_update_failure_is_err() -> None:
    # RFC 1939 section 6: if removal fails, the reply is negative.
    conn = logged_in()
    drive(conn, b"DELE 1\r\nQUIT\r\n")
    assert answer(conn, CommitDone(0, 1)).startswith(b"-ERR [SYS/TEMP]")


def test_quit_in_authorization_never_commits() -> None:
    events = drive(make(), b"QUIT\r\n")
    assert events == [Reply(b"+OK mailbag signing off.\r\n"), Close("quit")]


def test_eof_in_transaction_closes_without_commit() -> None:
    conn = logged_in()
    drive(conn, b"DELE 1\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Close("client closed the connection")


def test_noop_in_authorization_is_error() -> None:
    assert replies(drive(make(), b"NOOP\r\n")).startswith(b"-ERR NOOP is not valid")


def test_user_in_transaction_is_error() -> None:
    assert replies(drive(logged_in(), b"USER x\r\n")).startswith(b"-ERR USER is not valid")


@pytest.mark.parametrize(
    "line", [b"STAT:", b"\x00", b"\xff\xff", b"\r", b"", b"   ", b"ST\x00AT", b"\x80\x81"]
)
def test_strange_command_names_get_err(line: bytes) -> None:
    conn = logged_in()
    out = replies(drive(conn, line + b"\r\n"))
    assert out.startswith(b"-ERR") or out == b""
    assert conn.state is State.TRANSACTION


def test_line_too_long_is_error_and_connection_survives() -> None:
    # RFC 2449 section 4: command lines are limited to 255 octets.
    conn = logged_in()
    out = replies(drive(conn, b"NOOP " + b"x" * 300 + b"\r\nSTAT\r\n"))
    assert out == b"-ERR Line too long.\r\n+OK 3 600\r\n"


def test_endless_line_is_bounded() -> None:
    conn = make()
    for _ in range(100):
        conn.receive_data(b"A" * 10000)
        while not isinstance(conn.next_event(), NeedData | Close):
            pass
    assert conn._reader.buffered <= 20000  # memory stays bounded


def test_too_many_errors_closes() -> None:
    conn = make(policy=Pop3Policy(max_errors=3))
    events = drive(conn, b"X\r\nY\r\nZ\r\nQUIT\r\n")
    assert isinstance(events[-1], Close)
    # RFC 1939: one response per command; the third error's reply says goodbye, QUIT gets none.
    assert replies(events) == (
        b"-ERR Unknown command: X\r\n-ERR Unknown command: Y\r\n"
        b"-ERR Unknown command: Z; too many errors, closing connection.\r\n"
    )


def test_backspace_edits_password() -> None:
    # A raw terminal sends DEL for backspace; it must edit, not become part of the password.
    conn = make()
    events = drive(conn, b"USER demo\r\nPASS demx\x7fo\r\n")
    assert isinstance(events[-1], Login) and events[-1].password == "demo"


def test_telnet_iac_negotiation_ignored() -> None:
    conn = make()
    events = drive(conn, b"\xff\xfd\x18\xff\xfb\x1fUSER demo\xff\xfa\x18\x01\xff\xf0\r\n")
    assert replies(events) == b"+OK\r\n"


def test_apop_emits_apop_login() -> None:
    events = drive(make(), b"APOP demo c4c9334bac560ecc979e58001b3e22fb\r\n")
    assert events == [ApopLogin("demo", "c4c9334bac560ecc979e58001b3e22fb", "<1.2@test>")]


def test_apop_malformed_digest_fails_like_wrong_password() -> None:
    assert replies(drive(make(), b"APOP demo xyz\r\n")) == b"-ERR [AUTH] Authentication failed.\r\n"


def test_capa_lists_extensions() -> None:
    # RFC 2449 section 5.
    out = replies(drive(make(policy=Pop3Policy(stls=True)), b"CAPA\r\n"))
    lines = out.split(b"\r\n")
    assert lines[0] == b"+OK Capability list follows."
    for cap in (b"TOP", b"USER", b"UIDL", b"RESP-CODES", b"PIPELINING", b"STLS", b"SASL PLAIN"):
        assert cap in lines
    assert out.endswith(b"\r\n.\r\n")


def test_capa_after_login_keeps_what_was_offered_but_not_stls() -> None:
    # RFC 2449 section 5: capabilities offered before login are still announced after.
    conn = make(policy=Pop3Policy(stls=True))
    drive(conn, b"USER a\r\nPASS b\r\n")
    conn.send(LoginAccepted("a", []))
    lines = replies(drive(conn, b"CAPA\r\n")).split(b"\r\n")
    assert b"USER" in lines and b"SASL PLAIN" in lines and b"STLS" not in lines


def test_user_refused_without_tls_when_plaintext_disallowed() -> None:
    conn = make(plaintext_allowed=False, policy=Pop3Policy(stls=True))
    out = replies(drive(conn, b"USER demo\r\nCAPA\r\n"))
    assert out.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert b"\r\nUSER\r\n" not in out and b"SASL PLAIN" not in out


def test_stls_discards_pending_user_and_pipelined_bytes() -> None:
    # RFC 2595 section 4: nothing from before STLS survives it.
    conn = make(policy=Pop3Policy(stls=True))
    events = drive(conn, b"USER demo\r\nSTLS\r\nPASS injected\r\n")
    assert events[-1] == StartTls()
    assert conn.take_unprocessed() == b"PASS injected\r\n"
    conn.send(TlsStarted())
    assert replies(drive(conn, b"PASS x\r\n")).startswith(b"-ERR No user name given")


def test_stls_not_offered_is_error() -> None:
    assert replies(drive(make(), b"STLS\r\n")).startswith(b"-ERR STLS is not available")


def test_auth_bare_lists_mechanisms() -> None:
    assert replies(drive(make(), b"AUTH\r\n")) == b"+OK\r\nPLAIN\r\n.\r\n"


def test_auth_plain_initial_response() -> None:
    # RFC 4616: authzid NUL authcid NUL passwd.
    token = base64.b64encode(b"\x00demo\x00pass word")
    events = drive(make(), b"AUTH PLAIN " + token + b"\r\n")
    assert events == [Login("demo", "pass word", "PLAIN", "")]


def test_auth_plain_with_continuation() -> None:
    conn = make()
    assert replies(drive(conn, b"AUTH PLAIN\r\n")) == b"+ \r\n"
    events = drive(conn, base64.b64encode(b"\x00demo\x00pw") + b"\r\n")
    assert events == [Login("demo", "pw", "PLAIN", "")]


def test_auth_cancel_with_star() -> None:
    # RFC 5034 section 4: "*" cancels the exchange.
    conn = make()
    drive(conn, b"AUTH PLAIN\r\n")
    assert replies(drive(conn, b"*\r\n")) == b"-ERR Authentication cancelled.\r\n"
    assert conn.state is State.AUTHORIZATION


def test_auth_bad_base64_is_error() -> None:
    out = replies(drive(make(), b"AUTH PLAIN !!!!\r\n"))
    assert out == b"-ERR Invalid base64 data in initial response.\r\n"


def test_auth_unknown_mechanism() -> None:
    assert replies(drive(make(), b"AUTH X-FOO\r\n")) == (
        b"-ERR Unsupported authentication mechanism.\r\n"
    )


def test_auth_driver_mechanism_long_continuation_line() -> None:
    # SASL continuation lines may be far longer than 255 octets (OAuth tokens).
    conn = make(policy=Pop3Policy(sasl_mechanisms=("SCRAM-SHA-256",)))
    events = drive(conn, b"AUTH SCRAM-SHA-256\r\n")
    assert events == [SaslStart("SCRAM-SHA-256", None)]
    assert answer(conn, SaslChallenge(b"")) == b"+ \r\n"
    token = base64.b64encode(b"x" * 3000)
    events = drive(conn, token + b"\r\n")
    assert len(events) == 1 and getattr(events[0], "data", b"") == b"x" * 3000
    conn.send(SaslChallenge(b"c"))
    assert drive(conn, b"*\r\n")[-1] == SaslAbort()


def test_utf8_username_accepted_after_utf8() -> None:
    # RFC 6856 section 3.
    conn = make()
    events = drive(conn, b"UTF8\r\nUSER \xe5\xbc\xa0\xe4\xb8\x89\r\nPASS \xe5\xaf\x86\r\n")
    assert replies(events).startswith(b"+OK UTF8 enabled.\r\n+OK\r\n")
    assert isinstance(events[-1], Login) and events[-1].user == "张三"


def test_invalid_utf8_argument_is_error() -> None:
    assert replies(drive(make(), b"USER \xff\xfe\r\n")).startswith(b"-ERR")


def test_message_numbers_fixed_after_dele() -> None:
    # RFC 1939 section 4: message numbers do not change during a session.
    conn = logged_in()
    out = replies(drive(conn, b"DELE 1\r\nLIST 2\r\nUIDL 3\r\n"))
    assert out.endswith(b"+OK 2 200\r\n+OK 3 uid-c\r\n")


def test_retr_deleted_message_is_error() -> None:
    conn = logged_in()
    assert replies(drive(conn, b"DELE 2\r\nRETR 2\r\n")).endswith(b"-ERR Message 2 is deleted.\r\n")


def test_message_failed_returns_err_and_continues() -> None:
    conn = logged_in()
    drive(conn, b"RETR 1\r\n")
    assert answer(conn, MessageFailed("[SYS/TEMP] gone")).startswith(b"-ERR [SYS/TEMP]")
    assert replies(drive(conn, b"NOOP\r\n")) == b"+OK\r\n"


def test_replies_are_single_line_where_expected() -> None:
    conn = logged_in()
    for command in (b"STAT", b"LIST 1", b"UIDL 1", b"DELE 1", b"RSET", b"NOOP"):
        out = replies(drive(conn, command + b"\r\n"))
        assert out.count(b"\r\n") == 1, command
        assert len(out) <= 512


def test_lang_lists_languages() -> None:
    # RFC 6856 section 3: LANG without an argument lists the languages.
    out = replies(drive(make(), b"LANG\r\n"))
    assert out == "+OK Language listing follows.\r\nen English\r\nzh-CN 简体中文\r\n.\r\n".encode()


def test_lang_zh_cn_translates_text_but_not_codes_or_numbers() -> None:
    # RFC 6856 section 3: the +OK names the chosen tag; response codes stay parseable.
    conn = logged_in()
    out = replies(drive(conn, b"LANG zh-CN\r\nSTAT\r\nDELE 1\r\nRETR 1\r\nLIST 9\r\n"))
    assert out == (
        "+OK zh-CN 语言已改为简体中文。\r\n+OK 3 600\r\n+OK 第 1 封邮件已标记为删除。\r\n"
        "-ERR 第 1 封邮件已被标记删除。\r\n-ERR 没有第 9 封邮件。\r\n"
    ).encode()
    drive(conn, b"QUIT\r\n")
    assert answer(conn, CommitDone(0, 1)) == "-ERR [SYS/TEMP] 有 1 封邮件未能删除。\r\n".encode()


def test_lang_in_authorization_translates_auth_failure_with_code() -> None:
    conn = make()
    drive(conn, b"LANG zh\r\nUSER a\r\nPASS b\r\n")
    assert answer(conn, LoginRefused()) == "-ERR [AUTH] 认证失败。\r\n".encode()


def test_lang_star_and_unknown() -> None:
    conn = make()
    assert replies(drive(conn, b"LANG *\r\n")) == b"+OK en Language changed to English.\r\n"
    assert replies(drive(conn, b"LANG tlh\r\n")) == b"-ERR Invalid language.\r\n"


def test_lang_announced_in_capa_and_disabled_by_policy() -> None:
    assert b"\r\nLANG\r\n" in replies(drive(make(), b"CAPA\r\n"))
    off = make(policy=Pop3Policy(languages=()))
    assert b"\r\nLANG\r\n" not in replies(drive(off, b"CAPA\r\n"))
    assert replies(drive(off, b"LANG\r\n")).startswith(b"-ERR")

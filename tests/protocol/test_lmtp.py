"""The LMTP state machine, driven with plain byte strings (no sockets, no event loop).

Test names read ``test_<command>_<condition>``; RFC clauses are cited where a
test proves one (RFC 2033 LMTP, RFC 5321 SMTP, RFC 3463 enhanced codes,
RFC 1870 SIZE, RFC 2920 PIPELINING).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbag.protocol.dots import DotDecoder
from mailbag.protocol.events import Close, NeedData, Reply
from mailbag.protocol.lmtp import (
    CheckRecipient,
    DeliverMessage,
    DeliveryDone,
    LmtpConnection,
    LmtpEvent,
    LmtpPolicy,
    RecipientChecked,
    State,
    Status,
)

ACCEPT = Status(250, "2.1.5", "Recipient OK")
UNKNOWN = Status(550, "5.1.1", "No such user")
DELIVERED = Status(250, "2.0.0", "Delivered")
OVER_QUOTA = Status(552, "5.2.2", "Mailbox full")


def drive(conn: LmtpConnection, data: bytes = b"") -> list[LmtpEvent]:
    """Feed bytes; return events until the machine needs data, waits, or closes."""
    if data:
        conn.receive_data(data)
    events: list[LmtpEvent] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)
        if isinstance(event, Close | CheckRecipient | DeliverMessage):
            return events


def replies(events: list[LmtpEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Reply))


def greeted(policy: LmtpPolicy) -> LmtpConnection:
    """A new connection whose 220 greeting (its first event) was taken."""
    conn = LmtpConnection(policy)
    greeting = conn.next_event()
    assert isinstance(greeting, Reply) and greeting.data.startswith(b"220 ")
    return conn


def ready(**policy: object) -> LmtpConnection:
    conn = greeted(LmtpPolicy(hostname="mx.test", **policy))  # type: ignore[arg-type]
    drive(conn, b"LHLO client.test\r\n")
    return conn


def with_recipients(*addresses: str, **policy: object) -> LmtpConnection:
    conn = ready(**policy)
    assert replies(drive(conn, b"MAIL FROM:<s@example.org>\r\n")).startswith(b"250 2.1.0")
    for address in addresses:
        events = drive(conn, f"RCPT TO:<{address}>\r\n".encode())
        assert events == [CheckRecipient(address)]
        conn.send(RecipientChecked(ACCEPT))
        assert replies(drive(conn)) == b"250 2.1.5 Recipient OK\r\n"
    return conn


def stuff(message: bytes) -> bytes:
    """Dot-stuff CRLF text and add the terminator (RFC 5321 section 4.5.2)."""
    lines = message.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return body + b".\r\n"


def test_greeting_is_220_with_hostname() -> None:
    conn = LmtpConnection(LmtpPolicy(hostname="mx.test"))
    greeting = conn.next_event()
    assert isinstance(greeting, Reply) and greeting.data.startswith(b"220 mx.test ")


def test_lhlo_lists_extensions() -> None:
    """RFC 2033 section 4.1 (LHLO as EHLO); RFC 2920, 2034, 6152, 1870, 6531 keywords."""
    conn = greeted(LmtpPolicy(hostname="mx.test", max_message_size=1000))
    out = replies(drive(conn, b"LHLO client.test\r\n"))
    lines = out.split(b"\r\n")[:-1]
    assert lines[0] == b"250-mx.test"
    assert all(line.startswith(b"250-") for line in lines[:-1])
    assert lines[-1].startswith(b"250 ")
    keywords = {line[4:] for line in lines[1:]}
    assert {b"PIPELINING", b"ENHANCEDSTATUSCODES", b"8BITMIME", b"SIZE 1000"} <= keywords
    assert conn.state is State.READY


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
def test_helo_refused_in_lmtp(verb: bytes) -> None:
    """RFC 2033 section 4.1: LMTP sessions start with LHLO, not HELO/EHLO."""
    conn = greeted(LmtpPolicy())
    assert replies(drive(conn, verb + b" x\r\n")).startswith(b"500 5.5.1")
    assert conn.state is State.GREETED


def test_mail_before_lhlo_is_bad_sequence() -> None:
    """RFC 5321 section 4.1.4: MAIL before the greeting exchange is 503."""
    conn = greeted(LmtpPolicy())
    assert replies(drive(conn, b"MAIL FROM:<a@b>\r\n")).startswith(b"503 5.5.1")


def test_mail_null_sender_accepted() -> None:
    """RFC 5321 section 4.5.5: bounces use the null reverse-path <>."""
    conn = ready()
    assert replies(drive(conn, b"MAIL FROM:<>\r\n")) == b"250 2.1.0 Sender OK\r\n"
    assert conn.sender == ""


def test_mail_source_route_dropped() -> None:
    """RFC 5321 section 4.1.2 / appendix C: source routes are accepted and ignored."""
    conn = ready()
    drive(conn, b"MAIL FROM:<@relay.test:a@b.test>\r\n")
    assert conn.sender == "a@b.test"


def test_mail_bad_syntax_is_501_5_1_7() -> None:
    """RFC 3463: X.1.7 bad sender's mailbox address syntax."""
    conn = ready()
    assert replies(drive(conn, b"MAIL FROM:a@b\r\n")).startswith(b"501 5.1.7")
    assert replies(drive(conn, b"MAIL TO:<a@b>\r\n")).startswith(b"501 5.1.7")


def test_mail_declared_size_too_big_is_552() -> None:
    """RFC 1870 section 6: a SIZE= above the limit is refused at MAIL with 552."""
    conn = ready(max_message_size=100)
    assert replies(drive(conn, b"MAIL FROM:<a@b> SIZE=101\r\n")).startswith(b"552 5.3.4")
    assert replies(drive(conn, b"MAIL FROM:<a@b> SIZE=100 BODY=8BITMIME\r\n")).startswith(b"250")


def test_mail_unknown_parameter_is_555() -> None:
    """RFC 5321 section 4.1.1.11: unrecognised MAIL parameters get 555."""
    conn = ready()
    assert replies(drive(conn, b"MAIL FROM:<a@b> RET=FULL\r\n")).startswith(b"555 5.5.4")


def test_mail_nested_is_503() -> None:
    conn = with_recipients("a@b")
    assert replies(drive(conn, b"MAIL FROM:<x@y>\r\n")).startswith(b"503")


def test_rcpt_before_mail_is_bad_sequence() -> None:
    conn = ready()
    assert replies(drive(conn, b"RCPT TO:<a@b>\r\n")).startswith(b"503 5.5.1")


def test_rcpt_rejection_is_passed_through() -> None:
    """RFC 3463: X.1.1 bad destination mailbox address, as the driver decided."""
    conn = with_recipients()
    assert drive(conn, b"RCPT TO:<nobody@b>\r\n") == [CheckRecipient("nobody@b")]
    conn.send(RecipientChecked(UNKNOWN))
    assert replies(drive(conn)) == b"550 5.1.1 No such user\r\n"
    assert conn.recipients == []


def test_rcpt_bad_syntax_is_501_5_1_3() -> None:
    conn = with_recipients()
    assert replies(drive(conn, b"RCPT TO:<>\r\n")).startswith(b"501 5.1.3")
    assert replies(drive(conn, b"RCPT TO:<a b@c>\r\n")).startswith(b"501 5.1.3")


def test_rcpt_too_many_is_452() -> None:
    """RFC 5321 section 4.5.3.1.10: too many recipients is a temporary 452."""
    conn = with_recipients("a@b", "c@d", max_recipients=2)
    assert replies(drive(conn, b"RCPT TO:<e@f>\r\n")).startswith(b"452 4.5.3")


def test_data_without_recipients_is_503() -> None:
    """RFC 2033 section 4.2: DATA with no successful RCPT fails with 503."""
    conn = with_recipients()
    assert replies(drive(conn, b"DATA\r\n")).startswith(b"503 5.5.1")


def test_data_one_reply_per_recipient() -> None:
    """RFC 2033 section 4.2: after the final dot, one reply per accepted RCPT, in order."""
    conn = with_recipients("a@x", "b@x", "c@x")
    assert replies(drive(conn, b"DATA\r\n")).startswith(b"354 ")
    events = drive(conn, b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert events == [
        DeliverMessage("s@example.org", ("a@x", "b@x", "c@x"), b"Subject: hi\r\n\r\nbody\r\n",
                       "client.test")
    ]
    conn.send(DeliveryDone([DELIVERED, OVER_QUOTA, DELIVERED]))
    assert replies(drive(conn)) == (
        b"250 2.0.0 Delivered\r\n552 5.2.2 Mailbox full\r\n250 2.0.0 Delivered\r\n"
    )
    assert conn.state is State.READY and conn.recipients == []


def test_data_wrong_reply_count_is_refused() -> None:
    """A driver bug must not desynchronise the client (RFC 2033 section 4.2)."""
    conn = with_recipients("a@x", "b@x")
    drive(conn, b"DATA\r\n")
    drive(conn, b"x\r\n.\r\n")
    with pytest.raises(ValueError):
        conn.send(DeliveryDone([DELIVERED]))


def test_data_too_large_is_552_per_recipient() -> None:
    """RFC 1870 section 6.3 / RFC 3463 X.3.4: oversize gets 552 5.3.4, for each recipient."""
    conn = with_recipients("a@x", "b@x", max_message_size=10)
    drive(conn, b"DATA\r\n")
    events = drive(conn, b"0123456789ABCDEF\r\n" * 3 + b".\r\nNOOP\r\n")
    assert replies(events) == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n" * 2
        + b"250 2.0.0 OK\r\n"
    )
    assert not any(isinstance(e, DeliverMessage) for e in events)


def test_data_dot_stuffing_removed() -> None:
    """RFC 5321 section 4.5.2: a leading dot is removed from each data line."""
    conn = with_recipients("a@x")
    drive(conn, b"DATA\r\n")
    events = drive(conn, b"..\r\n..x\r\n.y\r\n...\r\nz.\r\n.\r\n")
    assert isinstance(events[0], DeliverMessage)
    assert events[0].message == b".\r\n.x\r\ny\r\n..\r\nz.\r\n"


def test_data_bare_lf_dot_does_not_end_data() -> None:
    """RFC 5321 section 4.1.1.4: only CRLF.CRLF ends data (no SMTP smuggling)."""
    conn = with_recipients("a@x")
    drive(conn, b"DATA\r\n")
    assert drive(conn, b"a\n.\nMAIL FROM:<evil@x>\r\nb\r\n.\n") == []
    events = drive(conn, b"\r\n.\r\n")
    assert isinstance(events[0], DeliverMessage)
    # The dot after "b\r\n" starts a line, so it is unstuffed; the ones after bare LF are not.
    assert events[0].message == b"a\n.\nMAIL FROM:<evil@x>\r\nb\r\n\n\r\n"


def test_data_empty_message() -> None:
    conn = with_recipients("a@x")
    drive(conn, b"DATA\r\n")
    events = drive(conn, b".\r\n")
    assert isinstance(events[0], DeliverMessage) and events[0].message == b""


def test_data_eight_bit_bytes_kept() -> None:
    """RFC 6152 (8BITMIME): octets above 127 pass unchanged."""
    body = "Subject: 中文\r\n\r\nÀ bientôt — 再见\r\n".encode() + bytes(range(128, 256)) + b"\r\n"
    conn = with_recipients("a@x")
    drive(conn, b"DATA\r\n")
    events = drive(conn, stuff(body))
    assert isinstance(events[0], DeliverMessage) and events[0].message == body


def test_pipelining_replies_in_order() -> None:
    """RFC 2920 section 3.1: a pipelined group gets its replies in command order."""
    conn = ready()
    events = drive(conn, b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    assert replies(events) == b"250 2.1.0 Sender OK\r\n"
    assert events[-1] == CheckRecipient("a@x")
    conn.send(RecipientChecked(ACCEPT))
    events = drive(conn)
    assert replies(events) == b"250 2.1.5 Recipient OK\r\n"
    assert events[-1] == CheckRecipient("b@x")
    conn.send(RecipientChecked(UNKNOWN))
    events = drive(conn, b"hello\r\n.\r\nQUIT\r\n")
    assert replies(events).startswith(b"550 5.1.1 No such user\r\n354")
    assert isinstance(events[-1], DeliverMessage) and events[-1].recipients == ("a@x",)
    conn.send(DeliveryDone([DELIVERED]))
    events = drive(conn)
    assert replies(events) == b"250 2.0.0 Delivered\r\n221 2.0.0 Bye\r\n"
    assert isinstance(events[-1], Close)


def test_rset_clears_transaction() -> None:
    """RFC 5321 section 4.1.1.5: RSET discards sender and recipients."""
    conn = with_recipients("a@x")
    assert replies(drive(conn, b"RSET\r\n")) == b"250 2.0.0 OK\r\n"
    assert conn.recipients == [] and conn.state is State.READY
    assert replies(drive(conn, b"DATA\r\n")).startswith(b"503")


def test_vrfy_does_not_enumerate_users() -> None:
    """RFC 5321 section 3.5.3: 252 when we will not verify."""
    assert replies(drive(ready(), b"VRFY root\r\n")).startswith(b"252 2.5.0")


def test_unknown_command_is_500() -> None:
    assert replies(drive(ready(), b"BDAT 10 LAST\r\n")).startswith(b"500 5.5.1")


def test_line_too_long_is_500_and_discarded() -> None:
    """RFC 5321 section 4.5.3.1.4: command lines are bounded."""
    conn = ready(max_command_line=64)
    events = drive(conn, b"NOOP " + b"x" * 100)
    assert replies(events).startswith(b"500 5.5.6")
    events = drive(conn, b"yyy\r\nNOOP\r\n")
    assert replies(events) == b"250 2.0.0 OK\r\n"


def test_errors_in_a_row_close_connection() -> None:
    conn = ready(max_errors=3)
    events = drive(conn, b"X\r\nX\r\nX\r\nNOOP\r\n")
    assert replies(events).endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert isinstance(events[-1], Close)
    # One reply per command: the third error's reply *is* the 421, nothing after it.
    assert replies(events).count(b"\r\n") == 3


def test_quit_is_221_and_closes() -> None:
    events = drive(ready(), b"QUIT\r\n")
    assert replies(events) == b"221 2.0.0 Bye\r\n" and isinstance(events[-1], Close)


def test_eof_during_data_delivers_nothing() -> None:
    """A connection lost before the final dot means no message (RFC 5321 section 4.1.1.4)."""
    conn = with_recipients("a@x")
    drive(conn, b"DATA\r\npartial\r\n")
    conn.receive_data(b"")
    events = drive(conn)
    assert len(events) == 1 and isinstance(events[0], Close)


def test_idle_only_between_transactions() -> None:
    conn = ready()
    assert conn.idle
    drive(conn, b"MAIL FROM:<a@b>\r\n")
    assert not conn.idle


# ---------------------------------------------------------------- DotDecoder

def decode_in_pieces(wire: bytes, cuts: list[int]) -> tuple[DotDecoder, bytes]:
    decoder = DotDecoder()
    out = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        out.append(decoder.feed(wire[prev:cut]))
        prev = cut
    return decoder, b"".join(out)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                   max_size=12).map(lambda ls: [b"." * (i % 3) + ln for i, ln in enumerate(ls)]),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    after=st.binary(max_size=10),
)
def test_data_decoder_any_chunking_round_trips(
    lines: list[bytes], cuts: list[int], after: bytes
) -> None:
    """Dot-transparency survives any TCP segmentation (RFC 5321 section 4.5.2)."""
    message = b"".join(ln + b"\r\n" for ln in lines)
    wire = stuff(message) + after
    decoder, out = decode_in_pieces(wire, [c for c in cuts if c <= len(wire)])
    assert decoder.done
    assert out == message
    assert decoder.trailing == after
    assert len(out) == len(message)


def test_data_decoder_byte_by_byte() -> None:
    message = b".a\r\n..\r\n\r\n.\r\nend\r\n"
    wire = stuff(message) + b"NEXT"
    decoder, out = decode_in_pieces(wire, list(range(len(wire))))
    assert out == message and decoder.trailing == b"NEXT"


def test_data_over_size_limit_is_dropped_but_end_found() -> None:
    """RFC 1870 section 6: over the limit, read to the final dot, store nothing, say 552."""
    conn = with_recipients("a@x", max_message_size=5)
    drive(conn, b"DATA\r\n")
    events = drive(conn, b"123456\r\n")
    assert events == []
    events = drive(conn, b".\r\nNOOP\r\n")
    assert replies(events) == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n" + (
        b"250 2.0.0 OK\r\n"
    )
    assert not any(isinstance(e, DeliverMessage) for e in events)

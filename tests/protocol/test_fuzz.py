"""Property tests: no input, however hostile, crashes the session object."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from mailbag.protocol.capabilities import Pop3Policy
from mailbag.protocol.events import (
    ApopLogin,
    BodyChunk,
    BodyEnd,
    Close,
    Commit,
    CommitDone,
    EndOfMessage,
    Login,
    LoginAccepted,
    LoginRefused,
    MessageOpened,
    NeedBody,
    NeedData,
    Reply,
    SaslAbort,
    SaslChallenge,
    SaslContinue,
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


KEYWORDS = [
    b"USER", b"PASS", b"APOP", b"AUTH", b"STLS", b"UTF8", b"CAPA", b"QUIT", b"STAT", b"LIST",
    b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET", b"NOOP", b"user", b"top", b"X",
]
ARGS = [b"", b" 1", b" 0", b" -1", b" 2 3", b" 99999999999", b" a b c", b" \x00", b" \xff",
        b" PLAIN", b" PLAIN AGRlbW8AZGVtbw==", b" SCRAM-SHA-256", b" =", b" *", b"\r"]

line = st.one_of(
    st.builds(lambda k, a: k + a, st.sampled_from(KEYWORDS), st.sampled_from(ARGS)),
    st.binary(max_size=300),
)
chunk_stream = st.lists(
    st.builds(lambda ls, sep: sep.join(ls) + sep, st.lists(line, max_size=5),
              st.sampled_from([b"\r\n", b"\n", b"\r"])),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(chunk_stream, st.booleans(), st.booleans())
def test_any_input_never_crashes(chunks: list[bytes], accept: bool, plaintext: bool) -> None:
    policy = Pop3Policy(stls=True, sasl_mechanisms=("PLAIN", "SCRAM-SHA-256"))
    conn = Pop3Connection(policy, timestamp="<1@x>", plaintext_allowed=plaintext)
    body: list[bytes] = []
    in_body = False  # after the +OK of RETR/TOP: replies are body bytes until EndOfMessage
    for chunk in chunks:
        conn.receive_data(chunk)
        for _ in range(1000):
            event = conn.next_event()
            if isinstance(event, NeedData | Close):
                break
            if isinstance(event, Reply):
                if in_body and not event.data.startswith(b"+OK"):
                    continue  # message body bytes, not a status line
                assert event.data.endswith(b"\r\n")
                first = event.data.split(b"\r\n", 1)[0]
                assert first[:3] in (b"+OK", b"-ER", b"+ ") or first.startswith(b"+")
                assert len(first) <= 512
            elif isinstance(event, Login | ApopLogin):
                if accept:
                    conn.send(LoginAccepted("u", [Msg("a", 10), Msg("b", 20)]))
                else:
                    conn.send(LoginRefused())
            elif isinstance(event, SaslStart | SaslContinue):
                conn.send(SaslChallenge(b"x"))
            elif isinstance(event, SendMessage):
                conn.send(MessageOpened())
                in_body = True
                body = [b".dot\nline\r\n", b"\r\n.", b"\n"]
            elif isinstance(event, NeedBody):
                conn.send(BodyChunk(body.pop(0)) if body else BodyEnd())
            elif isinstance(event, Commit):
                assert conn.state is State.UPDATE
                conn.send(CommitDone(len(event.uids), 0))
            elif isinstance(event, StartTls):
                conn.send(TlsStarted())
            elif isinstance(event, EndOfMessage):
                in_body = False
            elif isinstance(event, SaslAbort):
                pass
        if conn.state is State.CLOSED:
            break

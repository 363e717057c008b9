"""The async session driver over an in-memory stream and the in-memory store.

These prove the safety rules that live in the driver: deletions only at QUIT,
storage failures as [SYS/TEMP], a locked maildrop as [IN-USE], timeouts
never committing, and internal errors never reaching the client.
"""

from __future__ import annotations

import asyncio
import time

from mailbag.auth.users import UsersFile
from mailbag.errors import MessageGone
from mailbag.protocol.capabilities import Pop3Policy
from mailbag.session.authenticate import Authenticator
from mailbag.session.pop3 import Pop3Session, SessionSettings
from mailbag.session.throttle import FailureThrottle
from mailbag.storage.memory import MemoryStore
from mailbag.wireform import to_wire
from tests.session.memstream import MemoryStream


def make_session(
    users: UsersFile,
    store: MemoryStore,
    stream: MemoryStream,
    *,
    login_timeout: float = 5.0,
    idle_timeout: float = 5.0,
) -> Pop3Session:
    settings = SessionSettings(
        policy=Pop3Policy(),
        login_timeout=login_timeout,
        idle_timeout=idle_timeout,
    )
    auth = Authenticator(users, FailureThrottle(base=0.01, cap=0.02))
    return Pop3Session(
        stream, settings=settings, authenticator=auth, store=store,
        session_id="t1", timestamp="<1.1@test>",
    )


async def run_script(session: Pop3Session, stream: MemoryStream, *chunks: bytes) -> str:
    for chunk in chunks:
        stream.client_sends(chunk)
    stream.client_closes()
    await asyncio.wait_for(session.run(), 10)
    return stream.output.decode("latin-1")


def test_quit_applies_deletions(users: UsersFile) -> None:
    store = MemoryStore()
    store.seed("demo", b"one\n", b"two\n")
    stream = MemoryStream()
    out = asyncio.run(run_script(make_session(users, store, stream), stream,
                                 b"USER demo\r\nPASS demo\r\nDELE 1\r\nQUIT\r\n"))
    assert "+OK mailbag signing off (1 deleted, 1 left)." in out
    assert list(store.contents("demo").values()) == [b"two\n"]
    assert not store.is_locked("demo")


def test_dropped_connection_deletes_nothing(users: UsersFile) -> None:
    # RFC 1939 section 6: only QUIT from TRANSACTION enters UPDATE.
    store = MemoryStore()
    store.seed("demo", b"one\n", b"two\n")
    stream = MemoryStream()
    asyncio.run(run_script(make_session(users, store, stream), stream,
                           b"USER demo\r\nPASS demo\r\nDELE 1\r\nDELE 2\r\n"))
    assert len(store.contents("demo")) == 2
    assert not store.is_locked("demo")


def test_idle_timeout_deletes_nothing(users: UsersFile) -> None:
    store = MemoryStore()
    store.seed("demo", b"one\n")
    stream = MemoryStream()
    session = make_session(users, store, stream, idle_timeout=0.2)
    stream.client_sends(b"USER demo\r\nPASS demo\r\nDELE 1\r\n")
    asyncio.run(asyncio.wait_for(session.run(), 10))
    assert stream.output.decode().endswith("-ERR Autologout; idle for too long.\r\n")
    assert len(store.contents("demo")) == 1
    assert session.outcome == "timeout"


def test_login_timeout_is_absolute_before_login(users: UsersFile) -> None:
    # A client dribbling bytes cannot extend the pre-login deadline (slowloris).
    store = MemoryStore()
    stream = MemoryStream()
    session = make_session(users, store, stream, login_timeout=0.3)

    async def dribble() -> None:
        task = asyncio.create_task(session.run())
        for _ in range(20):
            stream.client_sends(b"N")
            await asyncio.sleep(0.05)
        await asyncio.wait_for(task, 5)

    asyncio.run(dribble())
    assert session.outcome == "timeout"


def test_wrong_password_and_unknown_user_look_identical(users: UsersFile) -> None:
    # Same reply, and both wait out the failure delay (no enumeration by timing).
    store = MemoryStore()
    outputs, durations = [], []
    for user in (b"demo", b"nosuchuser"):
        stream = MemoryStream()
        session = make_session(users, store, stream)
        session.authenticator.throttle.base = 0.3
        started = time.monotonic()
        out = asyncio.run(run_script(session, stream,
                                     b"USER " + user + b"\r\nPASS wrong\r\nQUIT\r\n"))
        durations.append(time.monotonic() - started)
        outputs.append(out.split("\r\n", 1)[1])
    assert outputs[0] == outputs[1]
    assert "-ERR [AUTH] Authentication failed." in outputs[0]
    assert all(d >= 0.3 for d in durations)
    assert abs(durations[0] - durations[1]) < 1.0  # generous: CI machines are noisy


def test_second_login_gets_in_use(users: UsersFile) -> None:
    # RFC 2449 section 8.1.1 [IN-USE]: the maildrop is locked for the session.
    store = MemoryStore()
    store.seed("demo", b"one\n")

    async def scenario() -> str:
        first = MemoryStream()
        s1 = make_session(users, store, first)
        t1 = asyncio.create_task(s1.run())
        first.client_sends(b"USER demo\r\nPASS demo\r\n")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if store.is_locked("demo"):
                break
        second = MemoryStream()
        out = await run_script(make_session(users, store, second), second,
                               b"USER demo\r\nPASS demo\r\n")
        first.client_sends(b"STAT\r\nQUIT\r\n")
        await asyncio.wait_for(t1, 5)
        assert "+OK 1 " in first.output.decode()
        return out

    out = asyncio.run(scenario())
    assert "-ERR [IN-USE]" in out


def test_storage_error_on_open_is_sys_temp(users: UsersFile) -> None:
    store = MemoryStore()
    store.fail_next("open")
    stream = MemoryStream()
    out = asyncio.run(run_script(make_session(users, store, stream), stream,
                                 b"USER demo\r\nPASS demo\r\n"))
    assert "-ERR [SYS/TEMP]" in out


def test_message_gone_is_sys_temp_and_session_continues(users: UsersFile) -> None:
    store = MemoryStore()
    store.seed("demo", b"one\n")
    store.fail_next("read", MessageGone("vanished"))
    stream = MemoryStream()
    out = asyncio.run(run_script(make_session(users, store, stream), stream,
                                 b"USER demo\r\nPASS demo\r\nRETR 1\r\nNOOP\r\nQUIT\r\n"))
    assert "-ERR [SYS/TEMP] Message 1 cannot be read right now.\r\n+OK\r\n" in out


def test_delete_failure_at_quit_is_err(users: UsersFile) -> None:
    store = MemoryStore()
    (uid,) = store.seed("demo", b"one\n")
    store.fail_delete_of(uid)
    stream = MemoryStream()
    out = asyncio.run(run_script(make_session(users, store, stream), stream,
                                 b"USER demo\r\nPASS demo\r\nDELE 1\r\nQUIT\r\n"))
    assert out.endswith("-ERR [SYS/TEMP] 1 messages could not be deleted.\r\n")


def test_retr_streams_large_message_byte_exact(users: UsersFile) -> None:
    body = b"".join(b"line %d .x\n.dot\n" % i for i in range(60000))
    message = b"Subject: big\n\n" + body
    store = MemoryStore()
    store.seed("demo", message)
    stream = MemoryStream()
    out = asyncio.run(run_script(make_session(users, store, stream), stream,
                                 b"USER demo\r\nPASS demo\r\nRETR 1\r\nQUIT\r\n")).encode("latin-1")
    start = out.index(b"octets\r\n") + len(b"octets\r\n")
    end = out.index(b"\r\n.\r\n", start) + 2
    wire = out[start:end].replace(b"\r\n..", b"\r\n.")
    assert wire == to_wire(message)


def test_internal_error_never_reaches_client(users: UsersFile) -> None:
    store = MemoryStore()
    store.seed("demo", b"one\n")
    stream = MemoryStream()
    session = make_session(users, store, stream)

    async def explode(*args: object) -> None:
        raise ZeroDivisionError("secret internals")

    session._commit = explode  # type: ignore[method-assign]
    out = asyncio.run(run_script(session, stream, b"USER demo\r\nPASS demo\r\nQUIT\r\n"))
    assert "ZeroDivision" not in out and "secret" not in out
    assert out.endswith("-ERR [SYS/TEMP] Internal server error; closing connection.\r\n")
    assert session.outcome == "internal error"
    assert not store.is_locked("demo")

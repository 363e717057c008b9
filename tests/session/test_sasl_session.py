"""SASL, STLS and send-side limits in the session driver, over an in-memory stream.

The client is interactive (SCRAM needs the server's nonce and salt before it can answer), so
these tests run the session as a task and talk to it line by line.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
import time
from collections.abc import Awaitable, Callable

import scramp  # type: ignore[import-untyped]

from mailbag.auth.scram import ScramSecrets
from mailbag.auth.users import UserRecord, UsersFile
from mailbag.errors import AuthError
from mailbag.protocol.capabilities import Pop3Policy
from mailbag.session.authenticate import Authenticator
from mailbag.session.pop3 import Pop3Session, SessionSettings
from mailbag.session.throttle import FailureThrottle
from mailbag.storage.memory import MemoryStore
from tests.session.memstream import MemoryStream

POLICY = Pop3Policy(sasl_mechanisms=("SCRAM-SHA-256", "PLAIN"), stls=True)


class Client:
    """Reads the session's output line by line, like a real client would."""

    def __init__(self, stream: MemoryStream) -> None:
        self.stream = stream
        self.seen = 0

    async def line(self, timeout: float = 5.0) -> bytes:
        async def wait() -> bytes:
            while True:
                end = self.stream.output.find(b"\r\n", self.seen)
                if end >= 0:
                    line = bytes(self.stream.output[self.seen : end])
                    self.seen = end + 2
                    return line
                await asyncio.sleep(0.001)

        return await asyncio.wait_for(wait(), timeout)

    async def cmd(self, data: bytes) -> bytes:
        self.stream.client_sends(data + b"\r\n")
        return await self.line()


def run(
    users: UsersFile,
    script: Callable[[Client], Awaitable[None]],
    *,
    stream: MemoryStream | None = None,
    plaintext: bool = True,
    login_timeout: float = 5.0,
    authenticator: Authenticator | None = None,
) -> Pop3Session:
    stream = stream or MemoryStream()
    settings = SessionSettings(
        policy=POLICY,
        login_timeout=login_timeout,
        plaintext_allowed=lambda _addr: plaintext,
    )
    session = Pop3Session(
        stream,
        settings=settings,
        authenticator=authenticator or Authenticator(users, FailureThrottle(base=0.0, cap=0.0)),
        store=MemoryStore(),
        session_id="t",
        timestamp="<1.1@test>",
        tls_context=ssl.create_default_context,
    )

    async def main() -> None:
        task = asyncio.create_task(session.run())
        client = Client(stream)
        assert (await client.line()).startswith(b"+OK")
        await script(client)
        stream.client_closes()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    return session


async def scram(client: Client, user: str, password: str) -> bytes:
    scram_client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    first = base64.b64encode(scram_client.get_client_first().encode())
    reply = await client.cmd(b"AUTH SCRAM-SHA-256 " + first)
    assert reply.startswith(b"+ "), reply
    scram_client.set_server_first(base64.b64decode(reply[2:]).decode())
    reply = await client.cmd(base64.b64encode(scram_client.get_client_final().encode()))
    if not reply.startswith(b"+ "):
        return reply
    scram_client.set_server_final(base64.b64decode(reply[2:]).decode())
    return await client.cmd(b"")


def test_auth_scram_logs_in_and_enters_transaction(users: UsersFile) -> None:
    # RFC 5034 section 4 + RFC 5802: full exchange, server-final as a challenge, then +OK.
    async def script(client: Client) -> None:
        assert (await scram(client, "demo", "demo")).startswith(b"+OK Logged in")
        assert (await client.cmd(b"STAT")).startswith(b"+OK 0 0")

    session = run(users, script)
    assert session.conn.user == "demo"


def test_auth_scram_wrong_password_is_auth_error(users: UsersFile) -> None:
    # RFC 3206 / RFC 2449 AUTH-RESP-CODE: a failed login says [AUTH].
    async def script(client: Client) -> None:
        assert await scram(client, "demo", "nope") == b"-ERR [AUTH] Authentication failed."
        assert (await scram(client, "demo", "demo")).startswith(b"+OK")

    run(users, script)


def test_auth_scram_cancel_mid_exchange(users: UsersFile) -> None:
    # RFC 5034 section 4: "*" cancels; the session is back in AUTHORIZATION.
    async def script(client: Client) -> None:
        first = scramp.ScramClient(["SCRAM-SHA-256"], "demo", "demo").get_client_first()
        assert (await client.cmd(b"AUTH SCRAM-SHA-256 " + base64.b64encode(first.encode())))[
            :2
        ] == b"+ "
        assert await client.cmd(b"*") == b"-ERR Authentication cancelled."
        assert await client.cmd(b"USER demo") == b"+OK"
        assert (await client.cmd(b"PASS demo")).startswith(b"+OK")

    run(users, script)


def test_auth_scram_without_initial_response(users: UsersFile) -> None:
    async def script(client: Client) -> None:
        assert await client.cmd(b"AUTH SCRAM-SHA-256") == b"+ "
        scram_client = scramp.ScramClient(["SCRAM-SHA-256"], "demo", "demo")
        reply = await client.cmd(base64.b64encode(scram_client.get_client_first().encode()))
        assert reply.startswith(b"+ ")

    run(users, script)


def test_auth_scram_users_database_unreadable_is_sys_temp(users: UsersFile) -> None:
    # RFC 3206 section 4: a server-side problem is [SYS/TEMP], not a wrong password.
    auth = Authenticator(users, FailureThrottle(base=0.0, cap=0.0))

    def broken(login: str) -> tuple[str, ScramSecrets | None] | None:
        raise AuthError("users file unreadable")

    auth.scram_credentials = broken  # type: ignore[method-assign]

    async def script(client: Client) -> None:
        first = base64.b64encode(b"n,,n=demo,r=abcdef")
        reply = await client.cmd(b"AUTH SCRAM-SHA-256 " + first)
        assert reply == b"-ERR [SYS/TEMP] Authentication is temporarily unavailable."

    run(users, script, authenticator=auth)


def test_auth_plain_authzid_must_be_the_user(users: UsersFile) -> None:
    # RFC 4616 section 2: we do not do proxy authorization.
    async def script(client: Client) -> None:
        other = base64.b64encode(b"other\0demo\0demo")
        assert await client.cmd(b"AUTH PLAIN " + other) == b"-ERR [AUTH] Authentication failed."
        own = base64.b64encode(b"demo\0demo\0demo")
        assert (await client.cmd(b"AUTH PLAIN " + own)).startswith(b"+OK")

    run(users, script)


def test_auth_scram_allowed_where_plaintext_is_not(users: UsersFile) -> None:
    # SCRAM never shows the password, so it stays available on an untrusted clear channel,
    # while USER and PLAIN are withdrawn from CAPA (RFC 2449 section 5: announce what works).
    async def script(client: Client) -> None:
        capa = [await client.cmd(b"CAPA")]
        while capa[-1] != b".":
            capa.append(await client.line())
        assert b"SASL SCRAM-SHA-256" in capa and b"USER" not in capa and b"STLS" in capa
        assert (await scram(client, "demo", "demo")).startswith(b"+OK")

    run(users, script, plaintext=False)


def test_stls_pipelined_commands_discarded_at_session_level(users: UsersFile) -> None:
    # RFC 2595 section 4: USER given before STLS and commands pipelined after it are dropped.
    async def script(client: Client) -> None:
        assert await client.cmd(b"USER demo") == b"+OK"
        client.stream.client_sends(b"STLS\r\nPASS demo\r\n")
        client.stream.client_sends(b"DELE 1\r\n")  # a second packet, still plaintext
        assert await client.line() == b"+OK Begin TLS negotiation now."
        await asyncio.sleep(0.05)
        assert client.stream.output[client.seen :] == b""  # no reply to the injected lines
        assert client.stream.secure
        assert await client.cmd(b"PASS demo") == b"-ERR No user name given; use USER first."

    run(users, script)


class StuckReader(MemoryStream):
    """A client that stops reading: the send buffer never drains."""

    async def drain(self) -> None:
        if len(self.output) > 100:
            await asyncio.Event().wait()


def test_capa_flood_from_non_reading_client_is_cut_at_deadline(users: UsersFile) -> None:
    # A client that pipelines and never reads cannot hold the session past its deadline.
    stream = StuckReader()

    async def script(client: Client) -> None:
        stream.client_sends(b"CAPA\r\n" * 50)
        await asyncio.sleep(0)

    session = run(users, script, stream=stream, login_timeout=0.3)
    assert session.outcome == "timeout"


def test_pass_login_switches_from_login_deadline_to_idle_timer(users: UsersFile) -> None:
    # RFC 1939 section 3: the autologout timer applies once logged in; the short pre-login
    # deadline must not cut an authenticated session.
    async def script(client: Client) -> None:
        assert await client.cmd(b"USER demo") == b"+OK"
        assert (await client.cmd(b"PASS demo")).startswith(b"+OK")
        await asyncio.sleep(0.4)  # past login_timeout, well within idle_timeout
        assert await client.cmd(b"NOOP") == b"+OK"

    session = run(users, script, login_timeout=0.3)
    assert session.outcome != "timeout"


class DatabaseUsers:
    """A users store that answers over the network: ``lookup_async``, and a blocking ``lookup``.

    ``lookup`` blocks the calling thread for a while (a query); it records
    which thread called it and whether the loop kept running meanwhile.
    """

    def __init__(self, users: UsersFile) -> None:
        self.users = users
        self.lookup_threads: list[int] = []
        self.in_lookup = False

    def lookup(self, login: str) -> UserRecord | None:
        self.lookup_threads.append(threading.get_ident())
        self.in_lookup = True
        try:
            time.sleep(0.3)
            return self.users.lookup(login)
        finally:
            self.in_lookup = False

    async def lookup_async(self, login: str) -> UserRecord | None:
        return self.users.lookup(login)


def test_auth_scram_lookup_on_a_database_does_not_block_the_loop(users: UsersFile) -> None:
    """The SCRAM step's synchronous user lookup runs off the event loop (issue 13)."""
    slow = DatabaseUsers(users)
    auth = Authenticator(slow, FailureThrottle(base=0.0, cap=0.0))
    loop_thread = threading.get_ident()  # asyncio.run runs the loop in this thread
    ticks_during_lookup = 0

    async def ticker() -> None:
        nonlocal ticks_during_lookup
        while True:
            await asyncio.sleep(0.005)
            ticks_during_lookup += slow.in_lookup

    async def script(client: Client) -> None:
        tick = asyncio.create_task(ticker())
        try:
            assert (await scram(client, "demo", "demo")).startswith(b"+OK Logged in")
        finally:
            tick.cancel()

    session = run(users, script, authenticator=auth)
    assert session.conn.user == "demo"
    assert slow.lookup_threads and loop_thread not in slow.lookup_threads
    assert ticks_during_lookup > 0  # other sessions' work went on during the query


def test_auth_scram_with_users_in_postgres(users: UsersFile) -> None:
    """SCRAM against ``auth.backend = "postgres"``: the same keys work, off the loop."""
    from mailbag.auth.pg_users import PostgresUsers
    from mailbag.auth.schemes import Argon2Params
    from tests.pgtest import fresh_database

    with fresh_database() as dsn:
        db_users = PostgresUsers(dsn, argon2_params=Argon2Params(1, 8, 1))
        db_users.add("carol", "s3cret")

        async def script(client: Client) -> None:
            assert await scram(client, "carol", "wrong") == b"-ERR [AUTH] Authentication failed."
            assert (await scram(client, "carol", "s3cret")).startswith(b"+OK Logged in")

        auth = Authenticator(db_users, FailureThrottle(base=0.0, cap=0.0))
        session = run(users, script, authenticator=auth)
        assert session.conn.user == "carol"

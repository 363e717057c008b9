"""One POP3 session: the protocol callbacks around the sans-IO ``Pop3Connection``.

``session.driver.Driver`` runs the loop; this class performs the I/O the core
asks for: checking credentials, opening and locking the maildrop, reading
stored chunks for a body, removing messages at QUIT, STLS.  The rules that
make mail safe live here and in the core, nowhere else:

* the maildrop is locked from login to the end of the session;
* deletions are applied only when the core emits ``Commit`` (QUIT from
  TRANSACTION); a timeout, a dropped connection, a shutdown or any error ends
  the session without touching storage;
* storage failures become ``[SYS/TEMP]``/``[IN-USE]`` replies, internal
  exceptions never reach the client (DESIGN.md rule 9).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import cast

from mailbag.errors import AuthError, MaildropLocked, MessageGone, StorageError
from mailbag.protocol.capabilities import Pop3Policy
from mailbag.protocol.events import (
    ApopLogin,
    BodyChunk,
    BodyEnd,
    Commit,
    CommitDone,
    EndOfMessage,
    Login,
    LoginAccepted,
    LoginRefused,
    MessageFailed,
    MessageOpened,
    NeedBody,
    SaslAbort,
    SaslChallenge,
    SaslContinue,
    SaslStart,
    SendMessage,
    StartTls,
    TlsStarted,
)
from mailbag.protocol.pop3 import Pop3Connection, State
from mailbag.session.authenticate import Authenticator, AuthResult
from mailbag.session.driver import Driver, SessionOver
from mailbag.session.observer import NULL_OBSERVER, SessionObserver, SessionStats
from mailbag.session.sasl import Challenge, Failure, SaslMechanism, Step, new_mechanism
from mailbag.session.stream import Stream, handshake
from mailbag.storage.base import Maildrop, Store, WholeReader

#: Messages up to this size (wire octets) are read whole and answered in one reply.
WHOLE_MESSAGE_MAX = 256 * 1024


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Per-server settings a session needs (derived from the config)."""

    policy: Pop3Policy
    greeting: str = "mailbag POP3 server ready."
    hostname: str = "localhost"
    login_timeout: float = 60.0
    idle_timeout: float = 600.0
    #: Decides whether plaintext auth is allowed for a peer on an unencrypted stream.
    plaintext_allowed: Callable[[str], bool] = field(default=lambda _addr: True)


class Pop3Session(Driver):
    """Serve one client from greeting to close."""

    def __init__(
        self,
        stream: Stream,
        *,
        settings: SessionSettings,
        authenticator: Authenticator,
        store: Store,
        session_id: str,
        timestamp: str,
        tls_context: Callable[[], ssl.SSLContext | None] = lambda: None,
        observer: SessionObserver = NULL_OBSERVER,
    ) -> None:
        super().__init__(stream, session_id=session_id)
        self.observer = observer
        self.settings = settings
        self.authenticator = authenticator
        self.store = store
        self.tls_context = tls_context
        self.address, port = stream.peer[0], stream.peer[1]
        self.peer = f"{self.address}:{port}"
        policy = settings.policy
        if policy.stls and tls_context() is None:
            policy = replace(policy, stls=False)
        self.core = self.conn = Pop3Connection(
            policy,
            timestamp=timestamp,
            greeting=settings.greeting,
            secure=stream.secure,
            plaintext_allowed=stream.secure or settings.plaintext_allowed(self.address),
        )
        self.maildrop: Maildrop | None = None
        #: The maildrop again if it reads small messages whole (``WholeReader``).
        self._whole_reader: WholeReader | None = None
        self.stats = SessionStats()
        self.deadline = self.started + settings.login_timeout
        self._command_seen = False
        self._sasl: SaslMechanism | None = None
        self._sasl_verdict: AuthResult | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._first: bytes | None = None

    # ------------------------------------------------------- driver hooks

    def log(self, event: str, level: int = logging.INFO, **fields: object) -> None:
        super().log(event, level, peer=self.peer, **fields)

    def read_deadline(self) -> float:
        if self._command_seen:
            self._command_seen = False
            self.deadline = time.monotonic() + self.settings.idle_timeout
        return self.deadline

    def send_timeout(self) -> float:
        if self.conn.state is State.AUTHORIZATION:
            return max(0.0, self.deadline - time.monotonic())
        return self.settings.idle_timeout

    def event_seen(self, event: object) -> None:
        """After login the idle timer restarts per command; before it the deadline is absolute.

        So a client dribbling one byte a minute cannot hold a connection open (slowloris).
        The restart itself happens at the next read (one clock call, not one per event).
        """
        if self.conn.state is State.TRANSACTION:
            self._command_seen = True

    def sent(self, octets: int) -> None:
        self.observer.sent(octets)

    def on_start(self) -> None:
        tls = getattr(self.stream, "tls_version", None) or ("yes" if self.stream.secure else "no")
        self.log("connect", tls=tls)

    async def on_end(self) -> None:
        await self._close_body()
        await self._release_maildrop()
        seconds = time.monotonic() - self.started
        self.observer.commands(self.conn.commands)
        self.observer.session_ended(seconds)
        self.log("logout", user=self.conn.user, outcome=self.outcome,
                 retrieved=self.stats.retrieved, deleted=self.stats.deleted,
                 octets=self.stats.octets_sent, seconds=round(seconds, 3))

    async def handle(self, event: object) -> None:
        conn = self.conn
        # The events of every RETR first, by exact type (a few isinstance calls per
        # message add up at thousands of messages per second).
        kind = type(event)
        if kind is SendMessage:
            await self._open_message(cast(SendMessage, event))
        elif kind is EndOfMessage:
            if self._chunks is not None:
                await self._close_body()
            if not cast(EndOfMessage, event).top:
                self.stats.retrieved += 1
        elif kind is NeedBody:
            await self._next_chunk()
        elif isinstance(event, Login | ApopLogin):
            await self.flush()
            await self._login(event)
        elif isinstance(event, Commit):
            await self._commit(event)
        elif isinstance(event, StartTls):
            await self._start_tls()
        elif isinstance(event, SaslStart):
            await self._sasl_start(event)
        elif isinstance(event, SaslContinue):
            mechanism = self._sasl
            if mechanism is None:  # cannot happen; never leave the core waiting
                conn.send(LoginRefused())
            else:
                await self._sasl_next(mechanism, functools.partial(mechanism.step, event.data))
        elif isinstance(event, SaslAbort):
            if self._sasl is not None:
                self.log("auth-cancelled", mechanism=self._sasl.name)
            self._sasl = self._sasl_verdict = None

    # ------------------------------------------------------------- login

    async def _login(self, event: Login | ApopLogin) -> None:
        mechanism = "APOP" if isinstance(event, ApopLogin) else event.mechanism
        try:
            if isinstance(event, ApopLogin):
                result = await self.authenticator.check_apop(
                    event.user, event.timestamp, event.digest, self.address
                )
            else:
                result = await self.authenticator.check_password(
                    event.user, event.password, self.address
                )
        except AuthError as exc:  # the users database itself is unreadable
            self._auth_unavailable(exc, mechanism)
            return
        # RFC 4616 section 2: no proxy authorization; only "act as myself" is accepted.
        authzid = event.authzid if isinstance(event, Login) else ""
        if authzid and result.user is not None and authzid not in (event.user, result.user):
            result = AuthResult(None, "authorization identity not allowed")
        await self._finish_login(result, event.user, mechanism)

    def _auth_unavailable(self, exc: AuthError, mechanism: str) -> None:
        self.observer.login("error", mechanism)
        self.log("auth-error", logging.ERROR, error=str(exc))
        self.conn.send(LoginRefused("[SYS/TEMP] Authentication is temporarily unavailable."))

    async def _sasl_start(self, event: SaslStart) -> None:
        mechanism = new_mechanism(event.mechanism, self.authenticator.scram_credentials)
        if mechanism is None:  # offered by the policy but not implemented: refuse cleanly
            self.conn.send(LoginRefused("Unsupported authentication mechanism."))
            return
        self._sasl, self._sasl_verdict = mechanism, None
        await self._sasl_next(mechanism, lambda: mechanism.start(event.initial))

    async def _sasl_next(self, mechanism: SaslMechanism, step: Callable[[], Step]) -> None:
        """Run one mechanism step and turn its result into a challenge or a login verdict.

        The verdict goes through ``Authenticator.conclude`` *before* anything reveals it
        (SCRAM's server-final message would), so guessing by SCRAM is throttled like
        guessing by USER/PASS.
        """
        try:
            result = await self.authenticator.sasl_step(step)
        except AuthError as exc:
            self._sasl = self._sasl_verdict = None
            self._auth_unavailable(exc, mechanism.name)
            return
        if isinstance(result, Challenge):
            self.conn.send(SaslChallenge(result.data))
            return
        await self.flush()
        if isinstance(result, Failure):
            self._sasl = self._sasl_verdict = None
            verdict = await self.authenticator.conclude(
                self.address, result.login, None, result.reason
            )
            await self._finish_login(verdict, result.login, mechanism.name)
            return
        if self._sasl_verdict is None:
            self._sasl_verdict = await self.authenticator.conclude(
                self.address, result.login, result.user, "ok"
            )
        if result.final is not None:
            # RFC 5034 section 4: no "additional data with success"; send it as a challenge.
            self.conn.send(SaslChallenge(result.final))
            return
        verdict, self._sasl, self._sasl_verdict = self._sasl_verdict, None, None
        await self._finish_login(verdict, result.login, mechanism.name)

    async def _finish_login(self, result: AuthResult, login: str, mechanism: str) -> None:
        if result.user is None:
            self.observer.login("failed", mechanism)
            self.log("login-failed", user=login, mechanism=mechanism, reason=result.reason)
            self.conn.send(LoginRefused())
            return
        try:
            maildrop = await self.store.open_maildrop(result.user)
        except MaildropLocked:
            self.observer.login("in_use", mechanism)
            self.log("login-failed", user=result.user, mechanism=mechanism, reason="in use")
            self.conn.send(LoginRefused("[IN-USE] Mailbox is locked by another POP3 session."))
            return
        except StorageError as exc:
            self.observer.login("error", mechanism)
            self.observer.storage_error("open")
            self.log("storage-error", logging.ERROR, user=result.user, error=str(exc))
            self.conn.send(LoginRefused("[SYS/TEMP] Mailbox unavailable, try again later."))
            return
        self.maildrop = maildrop
        # A plain attribute test: a runtime Protocol ``isinstance`` costs ~10 us.
        has_whole = callable(getattr(maildrop, "read_whole", None))
        self._whole_reader = cast(WholeReader, maildrop) if has_whole else None
        messages = maildrop.messages
        self.conn.send(LoginAccepted(result.user, messages))
        self.observer.login("ok", mechanism)
        self.log("login", user=result.user, mechanism=mechanism, messages=len(messages))

    # ----------------------------------------------------- bodies, QUIT

    async def _open_message(self, request: SendMessage) -> None:
        """Open the message and read its first chunk, so a failure can still be ``-ERR``.

        A small message is read whole when storage can (``WholeReader``): the
        core then answers it in one reply, with no chunk events.
        """
        maildrop = self.maildrop
        assert maildrop is not None
        try:
            reader = self._whole_reader
            if reader is not None and request.size <= WHOLE_MESSAGE_MAX:
                whole = await reader.read_whole(request.uid, WHOLE_MESSAGE_MAX)
                if whole is not None:
                    self.stats.octets_sent += len(whole)
                    self.conn.send(MessageOpened(whole))
                    return
            self._chunks = maildrop.read(request.uid).__aiter__()
            self._first = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._first = b""
        except (MessageGone, StorageError) as exc:
            await self._close_body()
            self.observer.storage_error("read")
            self.log("storage-error", logging.ERROR, user=self.conn.user, error=str(exc))
            text = f"[SYS/TEMP] Message {request.msn} cannot be read right now."
            self.conn.send(MessageFailed(text))
            return
        self.conn.send(MessageOpened())

    async def _next_chunk(self) -> None:
        chunk, self._first = self._first, None
        if chunk is None and self._chunks is not None:
            with contextlib.suppress(StopAsyncIteration):
                chunk = await self._chunks.__anext__()
        if chunk is None:
            self.conn.send(BodyEnd())
            return
        self.stats.octets_sent += len(chunk)
        self.conn.send(BodyChunk(chunk))

    async def _close_body(self) -> None:
        chunks, self._chunks, self._first = self._chunks, None, None
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def _release_maildrop(self) -> None:
        await self._close_body()
        if self.maildrop is not None:
            try:
                await self.maildrop.close()
            except StorageError as exc:
                self.observer.storage_error("close")
                self.log("error", logging.WARNING, error=str(exc))
            self.maildrop = self._whole_reader = None

    async def _commit(self, event: Commit) -> None:
        removed = failed = 0
        if event.uids:
            assert self.maildrop is not None
            try:
                result = await self.maildrop.delete(event.uids)
            except StorageError as exc:
                self.observer.storage_error("delete")
                self.log("storage-error", logging.ERROR, user=self.conn.user, error=str(exc))
                failed = len(event.uids)
            else:
                removed, failed = result.deleted, len(result.failed)
        self.stats.deleted = removed
        # Unlock before +OK: a client that reconnects at once must not find its
        # maildrop still locked (with the postgres backend the release is a query).
        await self._release_maildrop()
        self.conn.send(CommitDone(removed, failed))
        self.outcome = "quit" if not failed else "quit, some deletions failed"

    async def _start_tls(self) -> None:
        # Take what the client pipelined after STLS *before* sending +OK: anything
        # that arrives after +OK is the TLS handshake.
        leftover = len(self.conn.take_unprocessed() + self.stream.take_buffered())
        await self.flush()
        # Plaintext that slipped in while +OK was being sent; nothing awaits between this
        # and the protocol switch inside ``start_tls``, so no gap remains.
        leftover += len(self.stream.take_buffered())
        if leftover:
            # RFC 2595 section 4 / CVE-2011-0411 class: plaintext pipelined after
            # STLS must never be executed inside the TLS session.
            self.log("stls-injection", logging.WARNING, discarded=leftover)
        context = self.tls_context()
        if context is None:  # cannot happen: STLS is not offered without a context
            raise ConnectionError("TLS requested without a TLS context")
        remaining = max(0.0, self.deadline - time.monotonic())
        if not await handshake(self.stream, context, remaining, self.log):
            self.outcome = "tls handshake failed"
            raise SessionOver
        self.conn.send(TlsStarted())

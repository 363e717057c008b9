"""One POP3 session: the short async loop around the sans-IO ``Pop3Connection``.

It reads bytes, feeds the state machine, writes replies, and performs the I/O
the machine asks for: checking credentials, opening and locking the maildrop,
streaming messages, and removing messages at QUIT.  The rules that make mail
safe live here and in the core, nowhere else:

* the maildrop is locked from login to the end of the session;
* deletions are applied only when the core emits ``Commit`` (QUIT from
  TRANSACTION); a timeout, a dropped connection, a shutdown or any error ends
  the session without touching storage;
* storage failures become ``[SYS/TEMP]``/``[IN-USE]`` replies, internal
  exceptions never reach the client (DESIGN.md rule 9).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from mailbag.errors import AuthError, MaildropLocked, MessageGone, StorageError
from mailbag.logs import log_event
from mailbag.protocol.capabilities import Pop3Policy
from mailbag.protocol.events import (
    ApopLogin,
    Close,
    Commit,
    Login,
    NeedData,
    Reply,
    SaslAbort,
    SaslContinue,
    SaslStart,
    SendMessage,
    StartTls,
)
from mailbag.protocol.lines import MessageEncoder
from mailbag.protocol.pop3 import Pop3Connection, State
from mailbag.session.authenticate import Authenticator, AuthResult
from mailbag.session.sasl import Challenge, Failure, SaslMechanism, Step, new_mechanism
from mailbag.session.stream import Stream
from mailbag.storage.base import Maildrop, Store

#: Flush queued output once it grows past this, while streaming a message.
WRITE_HIGH_WATER = 256 * 1024


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


class SessionObserver(Protocol):
    """What a session reports for monitoring (``server.metrics.Metrics`` implements it).

    Optional: without one, sessions report to ``NULL_OBSERVER``, which does nothing.
    Arguments are server-chosen words (results, mechanisms, command names), never
    client text, so a monitoring system cannot be flooded with label values.
    """

    def login(self, result: str, mechanism: str) -> None:
        """A login finished: ``ok``, ``failed``, ``in_use`` or ``error``."""

    def commands(self, counts: Mapping[str, int]) -> None:
        """Commands received in the session, by name (reported at its end)."""

    def sent(self, octets: int) -> None:
        """Octets written to the client."""

    def storage_error(self, operation: str) -> None:
        """A storage operation failed: ``open``, ``read``, ``delete`` or ``close``."""

    def session_ended(self, seconds: float) -> None:
        """The session is over after ``seconds``."""


class _NullObserver:
    """The observer used when metrics are off."""

    def login(self, result: str, mechanism: str) -> None:
        pass

    def commands(self, counts: Mapping[str, int]) -> None:
        pass

    def sent(self, octets: int) -> None:
        pass

    def storage_error(self, operation: str) -> None:
        pass

    def session_ended(self, seconds: float) -> None:
        pass


NULL_OBSERVER: SessionObserver = _NullObserver()


@dataclass(slots=True)
class SessionStats:
    """Counters for the logout log line."""

    retrieved: int = 0
    octets_sent: int = 0
    deleted: int = 0


class Pop3Session:
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
        self.stream = stream
        self.observer = observer
        self.settings = settings
        self.authenticator = authenticator
        self.store = store
        self.session_id = session_id
        self.tls_context = tls_context
        self.address, port = stream.peer[0], stream.peer[1]
        self.peer = f"{self.address}:{port}"
        policy = settings.policy
        if policy.stls and tls_context() is None:
            policy = _without_stls(policy)
        self.conn = Pop3Connection(
            policy,
            timestamp=timestamp,
            greeting=settings.greeting,
            secure=stream.secure,
            plaintext_allowed=stream.secure or settings.plaintext_allowed(self.address),
        )
        self.maildrop: Maildrop | None = None
        self.stats = SessionStats()
        self._out = bytearray()
        self._started = time.monotonic()
        self._deadline = self._started + settings.login_timeout
        self.outcome = "disconnected"
        self._sasl: SaslMechanism | None = None
        self._sasl_verdict: AuthResult | None = None

    def _log(self, event: str, level: int = logging.INFO, **fields: object) -> None:
        log_event(event, level, session=self.session_id, peer=self.peer, **fields)

    async def _flush(self) -> None:
        if self._out:
            self.stream.write(bytes(self._out))
            self.observer.sent(len(self._out))
            self._out.clear()
        # A client that stops reading must not hold the session forever (slowloris on the
        # sending side): waiting for buffer space is bounded like waiting for input.
        async with asyncio.timeout(self._send_timeout()):
            await self.stream.drain()

    def _send_timeout(self) -> float:
        if self.conn.state is State.AUTHORIZATION:
            return max(0.0, self._deadline - time.monotonic())
        return self.settings.idle_timeout

    async def run(self) -> None:
        """Run the session; never raises for client behaviour or storage trouble."""
        tls = getattr(self.stream, "tls_version", None) or ("yes" if self.stream.secure else "no")
        self._log("connect", tls=tls)
        try:
            await self._loop()
        except _SessionOver:
            pass
        except (ConnectionError, asyncio.IncompleteReadError):
            self.outcome = "connection lost"
        except TimeoutError:
            self.outcome = "timeout"
        except asyncio.CancelledError:
            self.outcome = "shutdown"
            raise
        except Exception as exc:  # last line of defence: log it, never show it
            self.outcome = "internal error"
            self._log("error", logging.ERROR, error=repr(exc))
            logging.getLogger("mailbag").debug("session crash", exc_info=True)
            # Tell the client something generic rather than just hanging up.
            self._out.clear()
            self.stream.write(
                self.conn.error_reply("[SYS/TEMP] Internal server error; closing connection.")
            )
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        if self.maildrop is not None:
            try:
                await self.maildrop.close()
            except StorageError as exc:
                self.observer.storage_error("close")
                self._log("error", logging.WARNING, error=str(exc))
            self.maildrop = None
        self.stream.close()
        self.observer.commands(self.conn.commands)
        self.observer.session_ended(time.monotonic() - self._started)
        self._log(
            "logout",
            user=self.conn.user,
            outcome=self.outcome,
            retrieved=self.stats.retrieved,
            deleted=self.stats.deleted,
            octets=self.stats.octets_sent,
            seconds=round(time.monotonic() - self._started, 3),
        )

    async def _read_more(self) -> bool:
        """Wait for client bytes until the current deadline; False on timeout."""
        await self._flush()
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the read in a new
            # Task for every command, a measurable cost per RETR and per login.
            async with asyncio.timeout(remaining):
                data = await self.stream.read()
        except TimeoutError:
            return False
        self.conn.receive_data(data)
        return True

    def _command_seen(self) -> None:
        """A command was processed: after login, the idle timer restarts.

        Before login the deadline is absolute, so a client dribbling one byte
        a minute cannot hold a connection open (slowloris).
        """
        if self.conn.state is State.TRANSACTION:
            self._deadline = time.monotonic() + self.settings.idle_timeout

    async def _loop(self) -> None:
        conn = self.conn
        self._out += conn.greeting()
        while True:
            event = conn.next_event()
            if isinstance(event, NeedData):
                if not await self._read_more():
                    self._out += self.conn.error_reply("Autologout; idle for too long.")
                    await self._flush()
                    self.outcome = "timeout"
                    return
                continue
            self._command_seen()
            if isinstance(event, Reply):
                self._out += event.data
            elif isinstance(event, Login | ApopLogin):
                await self._flush()
                await self._login(event)
            elif isinstance(event, SendMessage):
                await self._send_message(event)
            elif isinstance(event, Commit):
                await self._commit(event)
            elif isinstance(event, StartTls):
                await self._start_tls()
            elif isinstance(event, SaslStart):
                await self._sasl_start(event)
            elif isinstance(event, SaslContinue):
                mechanism = self._sasl
                if mechanism is None:  # cannot happen; never leave the core waiting
                    self._out += conn.login_failed()
                else:
                    await self._sasl_next(mechanism, functools.partial(mechanism.step, event.data))
            elif isinstance(event, SaslAbort):
                if self._sasl is not None:
                    self._log("auth-cancelled", mechanism=self._sasl.name)
                self._sasl = self._sasl_verdict = None
            elif isinstance(event, Close):
                await self._flush()
                if self.outcome == "disconnected" or event.reason != "client closed the connection":
                    self.outcome = event.reason
                return

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
        self._log("auth-error", logging.ERROR, error=str(exc))
        self._out += self.conn.login_failed("[SYS/TEMP] Authentication is temporarily unavailable.")

    async def _sasl_start(self, event: SaslStart) -> None:
        mechanism = new_mechanism(event.mechanism, self.authenticator.scram_credentials)
        if mechanism is None:  # offered by the policy but not implemented: refuse cleanly
            self._out += self.conn.login_failed("Unsupported authentication mechanism.")
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
            self._out += self.conn.sasl_challenge(result.data)
            return
        await self._flush()
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
            self._out += self.conn.sasl_challenge(result.final)
            return
        verdict, self._sasl, self._sasl_verdict = self._sasl_verdict, None, None
        await self._finish_login(verdict, result.login, mechanism.name)

    async def _finish_login(self, result: AuthResult, login: str, mechanism: str) -> None:
        if result.user is None:
            self.observer.login("failed", mechanism)
            self._log("login-failed", user=login, mechanism=mechanism, reason=result.reason)
            self._out += self.conn.login_failed()
            return
        try:
            maildrop = await self.store.open_maildrop(result.user)
        except MaildropLocked:
            self.observer.login("in_use", mechanism)
            self._log("login-failed", user=result.user, mechanism=mechanism, reason="in use")
            self._out += self.conn.login_failed(
                "[IN-USE] Mailbox is locked by another POP3 session."
            )
            return
        except StorageError as exc:
            self.observer.login("error", mechanism)
            self.observer.storage_error("open")
            self._log("storage-error", logging.ERROR, user=result.user, error=str(exc))
            self._out += self.conn.login_failed("[SYS/TEMP] Mailbox unavailable, try again later.")
            return
        self.maildrop = maildrop
        messages = maildrop.messages
        self._out += self.conn.login_succeeded(result.user, messages)
        # The short pre-login deadline ends here; from now on RFC 1939's idle autologout.
        self._deadline = time.monotonic() + self.settings.idle_timeout
        self.observer.login("ok", mechanism)
        self._log("login", user=result.user, mechanism=mechanism, messages=len(messages))

    async def _send_message(self, request: SendMessage) -> None:
        assert self.maildrop is not None
        chunks = self.maildrop.read(request.uid).__aiter__()
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = b""
        except (MessageGone, StorageError) as exc:
            self.observer.storage_error("read")
            self._log("storage-error", logging.ERROR, user=self.conn.user, error=str(exc))
            self._out += self.conn.message_failed(
                f"[SYS/TEMP] Message {request.msn} cannot be read right now."
            )
            return
        self._out += self.conn.message_started()
        encoder = MessageEncoder(request.body_lines)
        self._out += encoder.feed(first)
        sent = len(first)
        try:
            while not encoder.done:
                if len(self._out) >= WRITE_HIGH_WATER:
                    await self._flush()
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                sent += len(chunk)
                self._out += encoder.feed(chunk)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        self._out += encoder.finish()
        self.stats.octets_sent += sent
        if request.body_lines is None:
            self.stats.retrieved += 1

    async def _commit(self, event: Commit) -> None:
        removed = failed = 0
        if event.uids:
            assert self.maildrop is not None
            try:
                result = await self.maildrop.delete(event.uids)
            except StorageError as exc:
                self.observer.storage_error("delete")
                self._log("storage-error", logging.ERROR, user=self.conn.user, error=str(exc))
                failed = len(event.uids)
            else:
                removed, failed = result.deleted, len(result.failed)
        self.stats.deleted = removed
        self._out += self.conn.commit_finished(removed, failed)
        self.outcome = "quit" if not failed else "quit, some deletions failed"

    async def _start_tls(self) -> None:
        # Take what the client pipelined after STLS *before* sending +OK: anything
        # that arrives after +OK is the TLS handshake.
        leftover = len(self.conn.take_unprocessed() + self.stream.take_buffered())
        await self._flush()
        # Plaintext that slipped in while +OK was being sent; nothing awaits between this
        # and the protocol switch inside ``start_tls``, so no gap remains.
        leftover += len(self.stream.take_buffered())
        if leftover:
            # RFC 2595 section 4 / CVE-2011-0411 class: plaintext pipelined after
            # STLS must never be executed inside the TLS session.
            self._log("stls-injection", logging.WARNING, discarded=leftover)
        if not await self._handshake():
            raise _SessionOver
        self.conn.tls_started()
        self.conn.plaintext_allowed = True

    async def _handshake(self) -> bool:
        """STLS handshake within the pre-login deadline; False if it failed.

        A failed or garbage handshake costs this one connection and one log line, never a
        traceback, and a client that stalls mid-handshake is cut at the login deadline.
        """
        context = self.tls_context()
        if context is None:  # cannot happen: STLS is not offered without a context
            raise ConnectionError("TLS requested without a TLS context")
        remaining = max(0.0, self._deadline - time.monotonic())
        try:
            async with asyncio.timeout(remaining):
                await self.stream.start_tls(context)
        except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are all OSErrors
            self.outcome = "tls handshake failed"
            reason = "timeout" if isinstance(exc, TimeoutError) else _short_reason(exc)
            self._log("tls-failed", reason=reason)
            return False
        version = getattr(self.stream, "tls_version", None)
        self._log("tls", version=version or "started")
        return True


def _without_stls(policy: Pop3Policy) -> Pop3Policy:
    return replace(policy, stls=False)


class _SessionOver(ConnectionError):
    """Ends the session quietly after the outcome was logged (e.g. a failed STLS handshake)."""


def _short_reason(exc: OSError) -> str:
    """One log-friendly phrase for a TLS failure (e.g. ``WRONG_VERSION_NUMBER``)."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    return type(exc).__name__

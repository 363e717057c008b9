"""Listeners: accept connections, enforce connection limits, run sessions, shut down cleanly.

Shutdown order matters for "nothing is ever lost": stop accepting, give open
sessions a grace period to finish on their own, then cancel the rest.  A
cancelled session never reaches ``Commit``, so its DELE marks are dropped and
every message stays on the server.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mailbag.config import ListenAddress
from mailbag.errors import ConfigError
from mailbag.logs import log_event
from mailbag.server.connection import ConnectionStream
from mailbag.server.gate import ConnectionGate, LocalGate
from mailbag.server.tls import TlsContext
from mailbag.session.authenticate import Authenticator
from mailbag.session.pop3 import NULL_OBSERVER, Pop3Session, SessionObserver, SessionSettings
from mailbag.storage.base import Store


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Caps on concurrent connections, in total and per client address."""

    total: int = 5000
    per_address: int = 50


class ServerObserver(SessionObserver, Protocol):
    """Connection-level events on top of the session's (``server.metrics.Metrics``)."""

    def connection_opened(self) -> None:
        """A session started."""

    def connection_closed(self) -> None:
        """A session ended."""

    def connection_refused(self) -> None:
        """A connection was turned away by the limits."""


class Pop3Server:
    """All POP3 listeners of one process and the sessions they run."""

    def __init__(
        self,
        *,
        listen: Sequence[ListenAddress],
        settings: SessionSettings,
        authenticator: Authenticator,
        store: Store,
        tls: TlsContext | None = None,
        limits: ConnectionLimits | None = None,
        observer: ServerObserver | None = None,
        gate: ConnectionGate | None = None,
    ) -> None:
        self.listen = tuple(listen)
        #: Counts connections against the caps (shared by all workers in a worker process).
        self.gate: ConnectionGate = gate if gate is not None else LocalGate()
        self.observer = observer
        self.settings = settings
        self.authenticator = authenticator
        self.store = store
        self.tls = tls
        self.limits = limits or ConnectionLimits()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._counter = itertools.count(1)
        self._hostname = settings.hostname or socket.gethostname() or "localhost"
        self.refused = 0

    @property
    def addresses(self) -> list[tuple[str, int, bool]]:
        """Bound (host, port, implicit_tls) triples; useful when a port was 0."""
        result = []
        for server, address in zip(self._servers, self.listen, strict=True):
            for sock in server.sockets:
                name = sock.getsockname()
                result.append((str(name[0]), int(name[1]), address.tls))
        return result

    @property
    def active_sessions(self) -> int:
        """Sessions currently running."""
        return len(self._tasks)

    def reconfigure(
        self,
        *,
        settings: SessionSettings,
        authenticator: Authenticator,
        store: Store,
        limits: ConnectionLimits,
    ) -> None:
        """Use new settings for sessions accepted from now on (SIGHUP reload).

        Open sessions keep the objects they started with, so a reload never
        disturbs them.  Listeners are not rebound (that needs a restart).
        """
        self.settings = settings
        self.authenticator = authenticator
        self.store = store
        self.limits = limits
        self._hostname = settings.hostname or socket.gethostname() or "localhost"

    def listening_sockets(self) -> list[socket.socket]:
        """The bound listening sockets, in ``start`` order (for a supervisor to pass on)."""
        result = []
        for server in self._servers:
            if len(server.sockets) != 1:
                raise ConfigError(
                    f"{server.sockets[0].getsockname()}: a name that resolves to several "
                    "addresses cannot be shared with workers; list each address"
                )
            sock = server.sockets[0]
            result.append(socket.fromfd(sock.fileno(), sock.family, sock.type))  # a dup
        return result

    async def accept(self) -> None:
        """Start accepting on listeners bound with ``start(accept=False)``."""
        for server in self._servers:
            await server.start_serving()

    async def start(
        self, *, accept: bool = True, sockets: Sequence[socket.socket] | None = None
    ) -> None:
        """Bind every listener; a port in use is one clear ConfigError.

        ``accept=False`` binds without accepting, so privileges can be dropped
        before the first connection is read (see ``server.privileges``).
        ``sockets``: already bound listening sockets, one per ``listen`` entry
        in order (a worker's, inherited from the supervisor).
        """
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(quiet_network_errors)
        for index, address in enumerate(self.listen):
            ssl_context = None
            if address.tls:
                if self.tls is None:
                    raise ConfigError(f"server.listen_tls {address}: no TLS certificate configured")
                # One live context per server: SIGHUP reloads the certificate *into* it.
                ssl_context = self.tls.context
            given = sockets[index] if sockets is not None else None
            # A client that stalls mid-handshake is cut like one that stalls at login.
            handshake = self._handshake_timeout() if ssl_context else None
            try:
                if given is not None:
                    server = await loop.create_server(
                        lambda: ConnectionStream(self._accepted), sock=given, ssl=ssl_context,
                        ssl_handshake_timeout=handshake, start_serving=accept,
                    )
                else:
                    server = await loop.create_server(
                        lambda: ConnectionStream(self._accepted), address.host, address.port,
                        ssl=ssl_context, ssl_handshake_timeout=handshake, reuse_address=True,
                        backlog=1024, start_serving=accept,
                    )
            except OSError as exc:
                await self.close_listeners()
                reason = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    reason = "address already in use"
                elif exc.errno == errno.EACCES:
                    reason = "permission denied (ports below 1024 need root)"
                raise ConfigError(f"cannot listen on {address}: {reason}") from None
            self._servers.append(server)
            log_event("listening", address=str(address), tls="implicit" if address.tls else "no")

    def _tls_context(self) -> ssl.SSLContext | None:
        """The context for STLS (``None``: no certificate, so STLS is not offered)."""
        return self.tls.context if self.tls is not None else None

    def _handshake_timeout(self) -> float:
        """POP3S handshake limit: the login timeout, at most 30 s, at least 1 s."""
        return max(1.0, min(30.0, self.settings.login_timeout))

    def _accepted(self, stream: ConnectionStream) -> None:
        address = stream.peer[0]
        if not self.gate.admit(address, self.limits.total, self.limits.per_address):
            self.refused += 1
            if self.observer is not None:
                self.observer.connection_refused()
            log_event("refused", logging.WARNING, peer=f"{address}:{stream.peer[1]}",
                      reason="too many connections")
            stream.write(b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n")
            stream.close()
            return
        number = next(self._counter)
        session = Pop3Session(
            stream,
            settings=self.settings,
            authenticator=self.authenticator,
            store=self.store,
            session_id=f"{number:x}{secrets.token_hex(2)}",
            timestamp=f"<{os.getpid()}.{number}.{int(time.time())}@{self._hostname}>",
            tls_context=self._tls_context,
            observer=self.observer or NULL_OBSERVER,
        )
        if self.observer is not None:
            self.observer.connection_opened()
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if self.observer is not None:
                self.observer.connection_closed()
            self.gate.release(address)

        task.add_done_callback(done)

    async def close_listeners(self) -> None:
        """Stop accepting new connections."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, wait up to ``grace`` seconds, then cancel remaining sessions."""
        for server in self._servers:
            server.close()
        if self._tasks:
            log_event("shutdown", sessions=len(self._tasks), grace=grace)
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        log_event("stopped")


def quiet_network_errors(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """Loop exception handler: a network error from a client is one log line, not a traceback.

    asyncio and uvloop already keep ``OSError`` from transports out of the log; this catches
    what slips through (a client resetting mid-handshake, a garbage TLS record surfacing
    through a callback), so a scanner hammering port 995 cannot flood the log with
    tracebacks.  Anything else is a real bug and goes to the default handler, traceback and all.
    """
    exc = context.get("exception")
    if isinstance(exc, OSError):
        log_event("network-error", logging.DEBUG, error=type(exc).__name__,
                  message=str(context.get("message", ""))[:200])
        return
    loop.default_exception_handler(context)

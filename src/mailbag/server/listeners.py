"""One listener for every kind of socket: plain or implicit TLS, TCP or Unix, POP3 or LMTP.

What differs between protocols is a small ``Service`` (``server.services``):
how to build a session, the connection caps, the line that refuses a
connection over the cap.  Everything else is here, once: binding (with one
clear ``ConfigError`` per address), accepting, counting connections against
the caps from the moment of accept (an implicit-TLS connection counts during
its handshake too, which this module runs itself rather than letting asyncio
run it before we see the connection: for those we accept ourselves and
hand the socket to ``loop.connect_accepted_socket(ssl=...)``), reconfiguration
on SIGHUP, and shutdown.

Shutdown order matters for "nothing is ever lost": stop accepting, ask every
session to stop (one between transactions ends at once: an idle LMTP
connection gets ``421``; a POP3 session carries on), give the rest a grace
period to finish on their own, then cancel.  A cancelled POP3 session never
reaches ``Commit``, so its DELE marks are dropped and every message stays on
the server; an LMTP transaction is allowed to finish first, or the MTA would
deliver it again (a duplicate).

Reuse: ``Endpoint.sock`` starts a listener on an already-bound socket (a
supervisor's inherited or shared socket), and the session takes the peer
address from the stream alone, so a PROXY-protocol front can replace it.

Behind a load balancer (``server.trusted_proxies``, ``server.proxy_front``):
a connection from a trusted proxy counts against the total cap at accept,
but against the per-address cap only once its PROXY header has named the
real client (the proxy itself would otherwise exhaust it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mailbag.config import ListenAddress
from mailbag.errors import ConfigError
from mailbag.logs import log_event
from mailbag.protocol.proxy import ProxyError
from mailbag.server.connection import ConnectionStream
from mailbag.server.gate import ConnectionGate, LocalGate
from mailbag.server.proxy_front import (
    Network,
    client_address,
    is_trusted,
    read_from_socket,
    read_from_stream,
)
from mailbag.server.tls import TlsContext
from mailbag.session.driver import Driver
from mailbag.session.stream import tls_failure_reason

#: Gate key of a trusted proxy's connection until its PROXY header names the client.
PROXIED = "proxied"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Caps on concurrent connections, in total and per client address."""

    total: int = 5000
    per_address: int = 50


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One listening socket: TCP ``host:port``, a Unix socket ``path``, or a bound ``sock``."""

    host: str = ""
    port: int = 0
    path: Path | None = None
    #: Permissions of a Unix socket file.
    mode: int = 0o660
    #: An already-bound listening socket (from a supervisor); host/port/path are then labels.
    sock: socket.socket | None = None
    #: Implicit TLS (RFC 8314): handshake right after accept, before the greeting.
    tls: bool = False

    @classmethod
    def tcp(cls, address: ListenAddress) -> Endpoint:
        """The endpoint for a configured ``host:port``."""
        return cls(host=address.host, port=address.port, tls=address.tls)

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Service(Protocol):
    """The protocol-specific part of a listener (``server.services``)."""

    #: ``pop3`` or ``lmtp``: in log lines and error messages.
    name: str
    limits: ConnectionLimits
    #: Sent (in plaintext) to a connection refused by the caps, then it is closed.
    refusal: bytes
    @property
    def trusted_proxies(self) -> Sequence[Network]:
        """Peers that must (and alone may) announce the real client with a PROXY header."""
        ...

    @property
    def handshake_timeout(self) -> float:
        """Longest an implicit-TLS handshake (or a PROXY header) may take."""
        ...

    def session(self, stream: ConnectionStream, number: int) -> Driver:
        """A new session for an accepted (and, for implicit TLS, handshaken) stream."""
        ...


class ListenerObserver(Protocol):
    """Connection-level events (``server.metrics.Metrics`` implements it)."""

    def connection_opened(self) -> None:
        """A connection was accepted and counted."""

    def connection_closed(self) -> None:
        """A counted connection ended."""

    def connection_refused(self) -> None:
        """A connection was turned away by the caps."""


class Listener:
    """The listening sockets of one service and the sessions they run."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        service: Service,
        *,
        tls: TlsContext | None = None,
        observer: ListenerObserver | None = None,
        backlog: int = 1024,
        gate: ConnectionGate | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.service = service
        self.tls = tls
        self.observer = observer
        self.backlog = backlog
        self.refused = 0
        self._servers: list[tuple[asyncio.Server, Endpoint]] = []
        #: Implicit-TLS endpoints: our own listening socket and accept loop each.
        self._tls_socks: list[tuple[socket.socket, Endpoint]] = []
        self._accept_loops: list[asyncio.Task[None]] = []
        self._sessions: dict[asyncio.Task[None], Driver | None] = {}
        #: Counts connections against the caps (shared by every worker, in a worker).
        self.gate: ConnectionGate = gate if gate is not None else LocalGate()
        #: The gate key each connection counts under (a proxy's: ``PROXIED`` until its header).
        self._address_of: dict[asyncio.Task[None], str] = {}
        #: The listening socket of each endpoint, in endpoint order (for a supervisor).
        self._bound: list[socket.socket] = []
        #: Unix socket files this listener created (and so removes): never an inherited
        #: one (the supervisor's), never one found in use by another process.
        self._created: list[Path] = []
        self._counter = itertools.count(1)

    @property
    def addresses(self) -> list[tuple[str, int, bool]]:
        """Bound TCP (host, port, implicit_tls) triples; useful when a port was 0."""
        socks = [(sock, e) for server, e in self._servers for sock in server.sockets]
        result = []
        for sock, endpoint in [*socks, *self._tls_socks]:
            name = sock.getsockname()
            if isinstance(name, tuple):
                result.append((str(name[0]), int(name[1]), endpoint.tls))
        return result

    @property
    def active_sessions(self) -> int:
        """Connections currently open (handshaking ones included)."""
        return len(self._sessions)

    def reconfigure(self, service: Service, tls: TlsContext | None = None) -> None:
        """Serve connections accepted from now on with ``service`` (SIGHUP reload).

        Open sessions keep the objects they started with, so a reload never
        disturbs them.  Sockets are not rebound (that needs a restart).
        """
        self.service = service
        if tls is not None:
            self.tls = tls

    async def start(self, *, accept: bool = True) -> None:
        """Bind every endpoint; an address in use is one clear ConfigError.

        ``accept=False`` binds without accepting (call ``accept`` later), so a
        server started as root can drop privileges before reading a byte.
        """
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(quiet_network_errors)
        try:
            for endpoint in self.endpoints:
                if endpoint.tls and self.tls is None:
                    raise ConfigError(f"server.listen_tls {endpoint}: no TLS certificate")
                if endpoint.tls:
                    sock = self._bind_tls(endpoint)
                    self._tls_socks.append((sock, endpoint))
                else:
                    server = await self._bind(loop, endpoint)
                    self._servers.append((server, endpoint))
                    sock = server.sockets[0]
                self._bound.append(sock)
                log_event("listening", address=str(endpoint), protocol=self.service.name,
                          tls="implicit" if endpoint.tls else "no")
            if accept:
                await self.accept()
        except BaseException:
            await self.close_listeners()
            raise

    def listening_sockets(self) -> list[socket.socket]:
        """Duplicates of the bound sockets, in endpoint order (for worker processes).

        A name that resolved to several addresses cannot be handed on as one socket.
        """
        for server, endpoint in self._servers:
            if len(server.sockets) != 1:
                raise ConfigError(f"{endpoint}: a name that resolves to several addresses "
                                  "cannot be shared with workers; list each address")
        return [socket.fromfd(s.fileno(), s.family, s.type) for s in self._bound]

    async def _bind(self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint) -> asyncio.Server:
        def factory() -> ConnectionStream:
            return ConnectionStream(lambda stream: self._accepted(stream, endpoint))

        if endpoint.sock is not None:
            return await loop.create_server(
                factory, sock=endpoint.sock, backlog=self.backlog, start_serving=False
            )
        if endpoint.path is not None:
            return await self._bind_unix(loop, endpoint, factory)
        try:
            return await loop.create_server(
                factory, endpoint.host, endpoint.port, reuse_address=True,
                backlog=self.backlog, start_serving=False,
            )
        except OSError as exc:
            raise self._bind_error(endpoint, exc) from None

    def _bind_tls(self, endpoint: Endpoint) -> socket.socket:
        """A listening socket for an implicit-TLS endpoint (accepted by ``_accept_tls``)."""
        if endpoint.sock is not None:
            sock = endpoint.sock
        else:
            try:
                family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
                sock = socket.create_server(
                    (endpoint.host, endpoint.port), family=family, backlog=self.backlog
                )
            except OSError as exc:
                raise self._bind_error(endpoint, exc) from None
        sock.setblocking(False)
        return sock

    def _bind_error(self, endpoint: Endpoint, exc: OSError) -> ConfigError:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need root)"
        what = "" if self.service.name == "pop3" else f" for {self.service.name.upper()}"
        return ConfigError(f"cannot listen{what} on {endpoint}: {reason}")

    async def _bind_unix(
        self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint,
        factory: Callable[[], ConnectionStream],
    ) -> asyncio.Server:
        path = endpoint.path
        assert path is not None
        key = f"{self.service.name}.socket"
        _remove_stale_socket(path, key)
        # Create it with no access, then open it up: no window with a wider mode.
        old_umask = os.umask(0o777)
        try:
            server = await loop.create_unix_server(
                factory, str(path), backlog=self.backlog, start_serving=False
            )
        except OSError as exc:
            raise ConfigError(f"{key}: cannot listen on {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        self._created.append(path)
        os.chmod(path, endpoint.mode)
        return server

    async def accept(self) -> None:
        """Start accepting on sockets bound with ``start(accept=False)``."""
        for server, _ in self._servers:
            await server.start_serving()
        loop = asyncio.get_running_loop()
        if not self._accept_loops:
            self._accept_loops = [
                loop.create_task(self._accept_tls(sock)) for sock, _ in self._tls_socks
            ]

    def _admit(self, address: str, port: int, *, per_address: bool = True) -> bool:
        """Count a new connection against the caps, at accept; False: refuse it.

        ``per_address`` False (a trusted proxy's connection): counted in the total
        only, under ``PROXIED``, until its header names the client (``_claim``).
        """
        limits = self.service.limits
        if per_address:
            admitted = self.gate.admit(address, limits.total, limits.per_address)
        else:
            admitted = self.gate.admit(PROXIED, limits.total, limits.total)
        if not admitted:
            self.refused += 1
            if self.observer is not None:
                self.observer.connection_refused()
            log_event("refused", logging.WARNING, peer=f"{address}:{port}",
                      protocol=self.service.name, reason="too many connections")
            return False
        return True

    def _claim(self, address: str, port: int) -> bool:
        """A proxied connection now has its real address: count it there (False: over cap)."""
        task = asyncio.current_task()
        if task is None or self._address_of.get(task) != PROXIED:
            return True
        self.gate.release(PROXIED)
        if not self._admit(address, port):  # refuses, logs the refusal; nothing counted
            del self._address_of[task]
            return False
        self._address_of[task] = address
        return True

    def _accepted(self, stream: ConnectionStream, endpoint: Endpoint) -> None:
        """A plain connection: count it against the caps at once, then serve it in a task."""
        service = self.service
        proxied = is_trusted(stream.peer[0], service.trusted_proxies)
        if not self._admit(*stream.peer, per_address=not proxied):
            stream.write(service.refusal)
            stream.close()
            return
        if proxied:
            self._track(self._run_proxied(stream, service), PROXIED)
        else:
            self._track(self._run(stream, service), stream.peer[0])

    async def _run_proxied(self, stream: ConnectionStream, service: Service) -> None:
        """A trusted proxy's connection: its PROXY header first, then the session."""
        proxy = stream.peer
        try:
            header = await read_from_stream(stream, service.handshake_timeout)
        except (ProxyError, TimeoutError, ConnectionError) as exc:
            self._proxy_failed(proxy, exc)
            stream.close()
            return
        real = client_address(header, proxy)
        stream.use_peer(real)
        if not self._claim(*real):
            stream.write(service.refusal)
            stream.close()
            return
        await self._run(stream, service)

    def _proxy_failed(self, proxy: tuple[str, int], exc: BaseException) -> None:
        reason = "timeout" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        log_event("proxy-failed", logging.WARNING, proxy=f"{proxy[0]}:{proxy[1]}",
                  protocol=self.service.name, reason=reason)

    async def _accept_tls(self, listening: socket.socket) -> None:
        """Accept implicit-TLS connections ourselves, so they count during the handshake."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except OSError as exc:  # EMFILE and friends: wait a moment rather than spin
                log_event("accept-error", logging.WARNING, error=str(exc))
                await asyncio.sleep(0.1)
                continue
            address, port = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("?", 0)
            service = self.service
            proxied = is_trusted(address, service.trusted_proxies)
            if not self._admit(address, port, per_address=not proxied):
                sock.close()  # a TLS client could not read a plaintext refusal
                continue
            coro = self._serve_tls(sock, (address, port), service, proxied=proxied)
            self._track(coro, PROXIED if proxied else address)

    async def _serve_tls(
        self, sock: socket.socket, client: tuple[str, int], service: Service, *, proxied: bool
    ) -> None:
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        if proxied:  # the PROXY header comes before the TLS handshake (HAProxy, TCP mode)
            try:
                header = await read_from_socket(sock, service.handshake_timeout)
            except (ProxyError, OSError) as exc:  # TimeoutError is an OSError
                self._proxy_failed(client, exc)
                sock.close()
                return
            client = client_address(header, client)
            if not self._claim(*client):
                sock.close()
                return
        peer = f"{client[0]}:{client[1]}"
        streams: list[ConnectionStream] = []
        try:
            await loop.connect_accepted_socket(
                lambda: ConnectionStream(streams.append), sock, ssl=self.tls.context,
                ssl_handshake_timeout=service.handshake_timeout,
            )
        except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are OSErrors
            reason = "timeout" if isinstance(exc, TimeoutError) else tls_failure_reason(exc)
            log_event("tls-failed", peer=peer, reason=reason)
            sock.close()
            return
        stream = streams[0]
        stream.use_peer(client)
        log_event("tls", peer=peer, version=stream.tls_version or "started")
        await self._run(stream, service)

    async def _run(self, stream: ConnectionStream, service: Service) -> None:
        session = service.session(stream, next(self._counter))
        task = asyncio.current_task()
        if task is not None and task in self._sessions:
            self._sessions[task] = session
        await session.run()

    def _track(self, coro: Coroutine[Any, Any, None], address: str) -> None:
        """Run one connection in a task that holds its place in the caps until it ends.

        ``address``: the gate key ``_admit`` counted it under (``PROXIED`` for a
        proxy's connection, moved to the client's address by ``_claim``).
        """
        if self.observer is not None:
            self.observer.connection_opened()
        task = asyncio.get_running_loop().create_task(coro)
        self._sessions[task] = None
        self._address_of[task] = address

        def done(t: asyncio.Task[None]) -> None:
            self._sessions.pop(t, None)
            if self.observer is not None:
                self.observer.connection_closed()
            counted = self._address_of.pop(t, None)
            if counted is not None:
                self.gate.release(counted)

        task.add_done_callback(done)

    async def close_listeners(self) -> None:
        """Stop accepting new connections and remove our Unix socket files."""
        for server, _ in self._servers:
            server.close()
        self._servers.clear()
        for task in self._accept_loops:
            task.cancel()
        self._accept_loops.clear()
        for sock, endpoint in self._tls_socks:
            if endpoint.sock is None:
                sock.close()
        self._tls_socks.clear()
        self._bound.clear()
        for path in self._created:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
        self._created.clear()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, ask sessions to stop, wait up to ``grace`` seconds, then cancel."""
        await self.close_listeners()
        if self._sessions:
            log_event("shutdown", protocol=self.service.name, sessions=len(self._sessions),
                      grace=grace)
            for session in self._sessions.values():
                if session is not None:
                    session.request_stop()
            _, pending = await asyncio.wait(set(self._sessions), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)


def _remove_stale_socket(path: Path, key: str) -> None:
    """Remove a socket file left by a crashed server; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{key}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody listening: stale
            return
    raise ConfigError(f"{key}: {path} is in use by another process")


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

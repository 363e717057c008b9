"""LMTP listeners (TCP and Unix socket) inside ``mailbag serve``.

A sibling of the POP3 ``Pop3Server``, reusing ``ConnectionStream`` for the
byte stream.  LMTP's clients are the local MTA, so the only limit is a cap
on concurrent connections (beyond it: ``421 4.3.2``, and the MTA retries).

Shutdown differs from POP3 on purpose: a POP3 session cut short loses
nothing (its deletions are dropped), but an LMTP transaction cut after the
message was stored and before the replies were sent makes the MTA deliver
it again: a duplicate.  So sessions are first asked to stop (idle ones get
``421`` at once, busy ones finish their transaction), and only sessions
still running after the grace period are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import secrets
import socket
import stat
from collections.abc import Sequence
from pathlib import Path

from mailbag.config import ListenAddress
from mailbag.errors import ConfigError
from mailbag.logs import log_event
from mailbag.protocol.lmtp import Status
from mailbag.server.connection import ConnectionStream
from mailbag.session.delivery import DeliveryAgent
from mailbag.session.lmtp import LmtpSession, LmtpSessionSettings

TOO_MANY = Status(421, "4.3.2", "Too many connections, try again later")


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a crashed server; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"lmtp.socket: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody listening: stale
            return
    raise ConfigError(f"lmtp.socket: {path} is in use by another process")


class LmtpServer:
    """All LMTP listeners of one process and the sessions they run."""

    def __init__(
        self,
        *,
        listen: Sequence[ListenAddress],
        socket_path: Path | None,
        settings: LmtpSessionSettings,
        agent: DeliveryAgent,
        socket_mode: int = 0o660,
        max_connections: int = 100,
    ) -> None:
        self.listen = tuple(listen)
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.settings = settings
        self.agent = agent
        self.max_connections = max_connections
        self._servers: list[asyncio.Server] = []
        self._sessions: dict[asyncio.Task[None], LmtpSession] = {}
        self._counter = itertools.count(1)
        self.refused = 0
        #: False in a worker: the supervisor created the socket file and removes it.
        self.owns_socket_file = True

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound TCP (host, port) pairs; useful when a port was 0."""
        result = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    result.append((str(name[0]), int(name[1])))
        return result

    @property
    def active_sessions(self) -> int:
        """Sessions currently running."""
        return len(self._sessions)

    async def start(
        self, *, accept: bool = True, sockets: Sequence[socket.socket] | None = None
    ) -> None:
        """Bind every listener; a port or socket in use is one clear ConfigError.

        ``accept=False`` binds without accepting (call ``accept`` later), so a
        server started as root can drop privileges before reading a byte.
        ``sockets``: already bound sockets (a worker's), one per TCP listener in
        order, then the Unix socket; the socket file then belongs to whoever bound it.
        """
        loop = asyncio.get_running_loop()
        if sockets is not None:
            self.owns_socket_file = False
            for sock in sockets:
                if sock.family == socket.AF_UNIX:
                    server = await loop.create_unix_server(
                        lambda: ConnectionStream(self._accepted), sock=sock,
                        start_serving=accept,
                    )
                else:
                    server = await loop.create_server(
                        lambda: ConnectionStream(self._accepted), sock=sock,
                        start_serving=accept,
                    )
                self._servers.append(server)
            return
        try:
            for address in self.listen:
                try:
                    server = await loop.create_server(
                        lambda: ConnectionStream(self._accepted),
                        address.host, address.port, reuse_address=True, backlog=256,
                        start_serving=accept,
                    )
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    if exc.errno == errno.EADDRINUSE:
                        reason = "address already in use"
                    elif exc.errno == errno.EACCES:
                        reason = "permission denied (ports below 1024 need root)"
                    raise ConfigError(f"cannot listen for LMTP on {address}: {reason}") from None
                self._servers.append(server)
                log_event("listening", address=str(address), protocol="lmtp")
            if self.socket_path is not None:
                await self._start_unix(loop, self.socket_path, accept)
        except BaseException:
            await self.close_listeners()
            raise

    async def _start_unix(
        self, loop: asyncio.AbstractEventLoop, path: Path, accept: bool
    ) -> None:
        _remove_stale_socket(path)
        # Create it with no access, then open it up: no window with a wider mode.
        old_umask = os.umask(0o777)
        try:
            server = await loop.create_unix_server(
                lambda: ConnectionStream(self._accepted), str(path), backlog=256,
                start_serving=accept,
            )
        except OSError as exc:
            raise ConfigError(
                f"lmtp.socket: cannot listen on {path}: {exc.strerror or exc}"
            ) from None
        finally:
            os.umask(old_umask)
        self._servers.append(server)
        os.chmod(path, self.socket_mode)
        log_event("listening", address=str(path), protocol="lmtp")

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

    def _accepted(self, stream: ConnectionStream) -> None:
        if len(self._sessions) >= self.max_connections:
            self.refused += 1
            log_event("refused", peer=f"{stream.peer[0]}:{stream.peer[1]}", protocol="lmtp",
                      reason="too many connections")
            stream.write(TOO_MANY.line())
            stream.close()
            return
        number = next(self._counter)
        session = LmtpSession(
            stream,
            settings=self.settings,
            agent=self.agent,
            session_id=f"L{number:x}{secrets.token_hex(2)}",
        )
        task = asyncio.get_running_loop().create_task(session.run())
        self._sessions[task] = session
        task.add_done_callback(lambda t: self._sessions.pop(t, None))

    async def close_listeners(self) -> None:
        """Stop accepting new connections and remove our socket file."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        if self.socket_path is not None and self.owns_socket_file:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                    self.socket_path.unlink()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let transactions finish (up to ``grace`` s), then cancel."""
        await self.close_listeners()
        if not self._sessions:
            return
        for session in self._sessions.values():
            session.request_stop()
        _, pending = await asyncio.wait(set(self._sessions), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

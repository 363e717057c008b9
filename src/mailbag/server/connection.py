"""An asyncio ``Protocol`` that implements the session's ``Stream`` interface.

A plain ``asyncio.Protocol`` rather than ``StreamReader``/``StreamWriter``:
it costs less memory per idle connection, and it gives us a public way to see
and discard bytes received before a STLS upgrade (``take_buffered``), which
``StreamReader`` keeps in a private buffer.  Reading is paused when too much
unread input piles up, so a client that floods us cannot grow memory.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

#: Unread input above which we stop reading from the socket.
READ_HIGH_WATER = 64 * 1024


class ConnectionStream(asyncio.Protocol):
    """One accepted connection; ``on_connect`` receives the stream to start a session."""

    def __init__(self, on_connect: Callable[[ConnectionStream], None]) -> None:
        self._on_connect = on_connect
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._reading_paused = False
        self._closed = False
        self._peer: tuple[str, int] = ("?", 0)
        self._secure = False
        self._discarding = False
        self._linger: asyncio.TimerHandle | None = None
        #: The loop, kept: ``asyncio.get_running_loop()`` makes a ``getpid`` system call
        #: (a fork check) every time, and ``read`` needs the loop once per command.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -------------------------------------------------- asyncio.Protocol side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = (str(peer[0]), int(peer[1]))
        self._secure = transport.get_extra_info("sslcontext") is not None
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return  # lingering after the last reply: read only so the close stays clean
        self._buffer += data
        if len(self._buffer) > READ_HIGH_WATER and self._transport and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self._eof = True
        self._closed = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -------------------------------------------------------- Stream side

    @property
    def peer(self) -> tuple[str, int]:
        return self._peer

    @property
    def secure(self) -> bool:
        return self._secure

    def use_peer(self, peer: tuple[str, int]) -> None:
        """Serve ``peer`` as the client's address (the PROXY header of a trusted proxy)."""
        self._peer = peer

    def unread(self, data: bytes) -> None:
        """Put octets back in front of the input (read past the PROXY header)."""
        if data:
            self._buffer[:0] = data

    async def read(self) -> bytes:
        while not self._buffer and not self._eof:
            loop = self._loop or asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._reading_paused and self._transport is not None and not self._closed:
            self._transport.resume_reading()
            self._reading_paused = False
        return data

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def take_buffered(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS as the server side (STLS).

        ``loop.start_tls`` pauses reading and swaps the protocol before its first ``await``,
        so a caller that empties ``take_buffered`` right before awaiting this leaves no gap
        in which plaintext could be read as if it were encrypted (RFC 2595 section 4).
        """
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        new_transport = await loop.start_tls(
            self._transport, self, context, server_side=True, ssl_handshake_timeout=30.0
        )
        if new_transport is None:
            raise ConnectionResetError("TLS handshake failed")
        self._transport = new_transport
        self._secure = True

    @property
    def tls_version(self) -> str | None:
        """Negotiated protocol (e.g. ``TLSv1.3``) for the log, or None before TLS."""
        if not self._secure or self._transport is None:
            return None
        ssl_object = self._transport.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else None
        return str(version) if version else None

    def close(self, *, linger: float = 0.0) -> None:
        """Close; with ``linger``, half-close first and discard input until the client closes.

        Closing a socket with unread input makes the kernel answer with a reset
        (RST), and the client may lose our last reply.  So a lingering close
        sends FIN after the queued output, keeps reading and discarding, and
        closes when the client does, or after ``linger`` seconds, without a
        task: the session is already over.  TLS cannot half-close; it closes now.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if linger <= 0 or self._eof or not transport.can_write_eof():
            transport.close()
            return
        self._discarding = True
        self._buffer.clear()
        if self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False
        transport.write_eof()
        self._linger = asyncio.get_running_loop().call_later(linger, transport.close)

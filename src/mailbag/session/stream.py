"""The whole I/O surface a session needs, as a tiny interface (DESIGN.md, httpcore).

The server implements it over an asyncio transport; tests implement it in
memory.  ``take_buffered`` exists for STLS: bytes a client sent before the TLS
handshake must be discarded, never read as if they came over TLS (the
STARTTLS command-injection class of bugs, RFC 2595 section 4).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Protocol


class Stream(Protocol):
    """A bidirectional byte stream to one client."""

    @property
    def peer(self) -> tuple[str, int]:
        """Remote address and port."""
        ...

    @property
    def secure(self) -> bool:
        """True once TLS protects the stream (implicit TLS or after STLS)."""
        ...

    async def read(self) -> bytes:
        """Return the next bytes received, or ``b""`` at end of stream."""
        ...

    def write(self, data: bytes) -> None:
        """Queue bytes for sending."""
        ...

    async def drain(self) -> None:
        """Wait until the send buffer is small enough (back-pressure)."""
        ...

    def take_buffered(self) -> bytes:
        """Remove and return bytes received but not yet read."""
        ...

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS as the server side."""
        ...

    def close(self, *, linger: float = 0.0) -> None:
        """Close the stream; pending output is flushed first when possible.

        ``linger`` > 0: a clean end after a last reply (FIN, then input is
        discarded for up to ``linger`` seconds so no unread byte causes a reset).
        """
        ...


LogFn = Callable[..., None]


async def handshake(stream: Stream, context: ssl.SSLContext, timeout: float, log: LogFn) -> bool:
    """Server-side TLS handshake for STLS within ``timeout``; False if it failed.

    A failed or garbage handshake costs this one connection and one log line, never a
    traceback, and a client that stalls mid-handshake is cut at the deadline.
    """
    try:
        async with asyncio.timeout(timeout):
            await stream.start_tls(context)
    except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError are all OSErrors
        reason = "timeout" if isinstance(exc, TimeoutError) else tls_failure_reason(exc)
        log("tls-failed", reason=reason)
        return False
    log("tls", version=getattr(stream, "tls_version", None) or "started")
    return True


def tls_failure_reason(exc: OSError) -> str:
    """One log-friendly phrase for a TLS failure (e.g. ``WRONG_VERSION_NUMBER``)."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    return type(exc).__name__

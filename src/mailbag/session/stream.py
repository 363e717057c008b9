"""The whole I/O surface a session needs, as a tiny interface (DESIGN.md, httpcore).

The server implements it over an asyncio transport; tests implement it in
memory.  ``take_buffered`` exists for STLS: bytes a client sent before the TLS
handshake must be discarded, never read as if they came over TLS (the
STARTTLS command-injection class of bugs, RFC 2595 section 4).
"""

from __future__ import annotations

import ssl
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

    def close(self) -> None:
        """Close the stream; pending output is flushed first when possible."""
        ...

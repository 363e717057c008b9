"""An in-memory ``Stream`` for session tests (DESIGN.md: httpcore-style tiny I/O surface)."""

from __future__ import annotations

import asyncio
import ssl


class MemoryStream:
    """Scripted client input, captured server output."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000), secure: bool = False) -> None:
        self._peer = peer
        self._secure = secure
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.output = bytearray()
        self.closed = False

    @property
    def peer(self) -> tuple[str, int]:
        return self._peer

    @property
    def secure(self) -> bool:
        return self._secure

    def client_sends(self, data: bytes) -> None:
        self.inbox.put_nowait(data)

    def client_closes(self) -> None:
        self.inbox.put_nowait(b"")

    async def read(self) -> bytes:
        return await self.inbox.get()

    def write(self, data: bytes) -> None:
        self.output += data

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def take_buffered(self) -> bytes:
        data = b""
        while not self.inbox.empty():
            data += self.inbox.get_nowait()
        return data

    async def start_tls(self, context: ssl.SSLContext) -> None:
        self._secure = True

    def close(self, *, linger: float = 0.0) -> None:
        self.closed = True
        self.lingered = linger > 0

"""Helpers shared by the storage tests (imported, unlike conftest fixtures)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from mailbag.storage.base import Maildrop

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion on a fresh event loop.

    Database pools opened on that loop are closed before it ends (they
    cannot outlive their loop).
    """

    async def main() -> T:
        try:
            return await coro
        finally:
            if "mailbag.database.pool" in sys.modules:
                from mailbag.database.pool import close_all

                await close_all()

    return asyncio.run(main())


async def read_all(maildrop: Maildrop, uid: str, chunk_size: int = 65536) -> bytes:
    """Concatenate everything ``read`` yields."""
    chunks: AsyncIterator[bytes] = maildrop.read(uid, chunk_size=chunk_size)
    return b"".join([chunk async for chunk in chunks])


def subprocess_env() -> dict[str, str]:
    """Environment for helper processes: can import mailbag and the helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE), env.get("PYTHONPATH", "")])
    return env

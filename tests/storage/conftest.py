"""Fixtures shared by the storage tests: both backends behind one ``store``.

The contract suite takes ``store`` and runs once per backend, so every
backend is held to the same behaviour (DESIGN.md rule 6).  Async code runs
through ``asyncio.run`` (no pytest plugin needed).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:  # the package may not be installed in the venv
    sys.path.insert(0, str(SRC))

from mailbag.storage.base import Maildrop, Store  # noqa: E402
from mailbag.storage.maildir import MaildirStore  # noqa: E402
from mailbag.storage.memory import MemoryStore  # noqa: E402

T = TypeVar("T")

HERE = Path(__file__).resolve().parent


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion on a fresh event loop."""
    return asyncio.run(coro)


async def read_all(maildrop: Maildrop, uid: str, chunk_size: int = 65536) -> bytes:
    """Concatenate everything ``read`` yields."""
    chunks: AsyncIterator[bytes] = maildrop.read(uid, chunk_size=chunk_size)
    return b"".join([chunk async for chunk in chunks])


def subprocess_env() -> dict[str, str]:
    """Environment for helper processes: can import mailbag and the helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def maildir_store(tmp_path: Path) -> MaildirStore:
    """A Maildir store rooted in a fresh temporary directory."""
    return MaildirStore(str(tmp_path / "mail" / "{user}"))


@pytest.fixture(params=["maildir", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every backend, one test run each."""
    if request.param == "maildir":
        yield MaildirStore(str(tmp_path / "mail" / "{user}"))
    else:
        yield MemoryStore()

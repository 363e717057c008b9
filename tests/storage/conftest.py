"""Fixtures shared by the storage tests: both backends behind one ``store``.

The contract suite takes ``store`` and runs once per backend, so every
backend is held to the same behaviour (DESIGN.md rule 6).  Async code runs
through ``asyncio.run`` (see ``helpers.run``; no pytest plugin needed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbag.storage.base import Store
from mailbag.storage.maildir import MaildirStore
from mailbag.storage.memory import MemoryStore
from tests.pgtest import fresh_database


@pytest.fixture
def maildir_store(tmp_path: Path) -> MaildirStore:
    """A Maildir store rooted in a fresh temporary directory."""
    return MaildirStore(str(tmp_path / "mail" / "{user}"))


@pytest.fixture(params=["maildir", "memory", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every backend, one test run each (PostgreSQL: in a fresh database)."""
    if request.param == "maildir":
        yield MaildirStore(str(tmp_path / "mail" / "{user}"))
    elif request.param == "memory":
        yield MemoryStore()
    else:
        from mailbag.storage.postgres import PostgresStore

        with fresh_database() as dsn:
            pg = PostgresStore(dsn, pool_min_size=1, pool_max_size=4)
            yield pg
            asyncio.run(pg.close())

"""Known-good networks persisted in a small state file: atomic, debounced, bounded, forgiving."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbag.session.known_good import MAX_FILE_BYTES, KnownNetworksFile

DAY = 86400.0
TTL = 30 * DAY


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Events(logging.Handler):
    """Event names logged by mailbag (its logger may not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.getMessage())


@pytest.fixture
def events() -> Iterator[Events]:
    logger = logging.getLogger("mailbag")
    handler, level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_known_good_remember_then_known_until_ttl() -> None:
    clock = Clock()
    store = KnownNetworksFile(None, clock=clock)
    assert not run(store.is_known("alice", "192.0.2.0/24", TTL))
    run(store.remember("alice", "192.0.2.0/24", TTL))
    assert run(store.is_known("alice", "192.0.2.0/24", TTL))
    assert not run(store.is_known("bob", "192.0.2.0/24", TTL))
    clock.now += TTL + 1
    assert not run(store.is_known("alice", "192.0.2.0/24", TTL))


def test_known_good_file_written_once_after_a_burst_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "known-good.json"
    clock = Clock()

    async def burst() -> int:
        store = KnownNetworksFile(path, clock=clock, flush_delay=0.05)
        for n in range(20):
            await store.remember(f"user{n}", "192.0.2.0/24", TTL)
        assert not path.exists()  # debounced: nothing written on the login path
        await asyncio.sleep(0.3)
        assert path.exists()
        writes = path.stat().st_mtime_ns
        await store.remember("user0", "192.0.2.0/24", TTL)  # a refresh within the hour
        await asyncio.sleep(0.2)
        assert path.stat().st_mtime_ns == writes  # ... is not worth a write
        await store.close()
        return len(store)

    assert run(burst()) == 20
    assert path.stat().st_mode & 0o777 == 0o600
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    again = KnownNetworksFile(path, clock=clock)
    assert run(again.is_known("user7", "192.0.2.0/24", TTL))
    doc = json.loads(path.read_text())
    assert doc["format"] == "mailbag-known-good" and doc["version"] == 1


def test_known_good_close_writes_pending_changes(tmp_path: Path) -> None:
    path = tmp_path / "state.json"

    async def scenario() -> None:
        store = KnownNetworksFile(path, flush_delay=3600)
        await store.remember("alice", "2001:db8::/64", TTL)
        await store.close()

    run(scenario())
    assert "2001:db8::/64" in json.loads(path.read_text())["accounts"]["alice"]


def test_known_good_expired_entries_not_written(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    clock = Clock()

    async def scenario() -> None:
        store = KnownNetworksFile(path, clock=clock, flush_delay=3600)
        await store.remember("old", "192.0.2.0/24", TTL)
        clock.now += TTL + 5
        await store.remember("new", "192.0.2.0/24", TTL)
        await store.close()

    run(scenario())
    assert set(json.loads(path.read_text())["accounts"]) == {"new"}


def test_known_good_bounded_per_account_and_in_accounts() -> None:
    clock = Clock()
    store = KnownNetworksFile(None, clock=clock, max_accounts=3, max_networks=2)
    for n in range(3):
        clock.now += 1
        run(store.remember("alice", f"10.0.{n}.0/24", TTL))
    assert not run(store.is_known("alice", "10.0.0.0/24", TTL))  # oldest network dropped
    assert run(store.is_known("alice", "10.0.2.0/24", TTL))
    for name in ("b", "c", "d"):
        run(store.remember(name, "10.9.9.0/24", TTL))
    assert len(store) == 3 and not run(store.is_known("alice", "10.0.2.0/24", TTL))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe garbage",
        b'{"format": "something-else", "version": 1, "accounts": {}}',
        b'{"format": "mailbag-known-good", "version": 99, "accounts": {}}',
        b'{"format": "mailbag-known-good", "version": 1, "accounts": {"a": {"n": "x"}}}',
        b'{"format": "mailbag-known-good", "version": 1, "accounts": []}',
        b"[1, 2, 3]",
    ],
)
def test_known_good_corrupt_file_ignored_with_one_log_line(
    tmp_path: Path, content: bytes, events: Events
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    store = KnownNetworksFile(path)
    assert len(store) == 0
    assert events.names == ["known-good-state-ignored"]


def test_known_good_oversized_file_refused(tmp_path: Path, events: Events) -> None:
    path = tmp_path / "state.json"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    KnownNetworksFile(path)
    assert events.names == ["known-good-state-ignored"]


def test_known_good_unwritable_directory_logged_once_and_kept_in_memory(
    tmp_path: Path, events: Events
) -> None:
    path = tmp_path / "missing-dir" / "state.json"

    async def scenario() -> bool:
        store = KnownNetworksFile(path, flush_delay=3600)
        await store.remember("alice", "192.0.2.0/24", TTL)
        await store.flush()
        await store.remember("bob", "192.0.2.0/24", TTL)
        await store.close()
        return await store.is_known("alice", "192.0.2.0/24", TTL)

    assert run(scenario())
    assert events.names == ["known-good-state-unwritable"]

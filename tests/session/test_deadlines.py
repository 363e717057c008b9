"""The driver's one deadline timer per session (``session.driver``): reads and drains.

The timer is set lazily (it follows a later deadline only when it fires), so
these check the cases a lazy timer could get wrong: a deadline that moves
*earlier* (login -> a short idle timeout), a deadline that keeps moving later
(a busy client must never be cut), a shutdown cancellation that must not be
mistaken for a timeout, and no timer left behind when the session ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mailbag.auth.users import UsersFile
from mailbag.storage.memory import MemoryStore
from tests.session.memstream import MemoryStream
from tests.session.test_pop3_session import make_session

AUTOLOGOUT = "-ERR Autologout; idle for too long.\r\n"


def demo_session(users: UsersFile, **timeouts: float) -> tuple[MemoryStore, MemoryStream, Any]:
    """A session over a memory stream for ``demo``, who has one message."""
    store = MemoryStore()
    store.seed("demo", b"one\n")
    stream = MemoryStream()
    return store, stream, make_session(users, store, stream, **timeouts)


def test_idle_timeout_shorter_than_login_deadline_fires_on_time(users: UsersFile) -> None:
    # RFC 1939 section 3 autologout: after login the idle timer (0.2 s here) replaces the
    # login deadline (5 s), so the timer must move earlier, not wait for the old deadline.
    _, stream, session = demo_session(users, login_timeout=5.0, idle_timeout=0.2)
    stream.client_sends(b"USER demo\r\nPASS demo\r\n")
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(session.run(), 10))
    assert time.monotonic() - started < 2.0
    assert stream.output.decode().endswith(AUTOLOGOUT)
    assert session.outcome == "timeout"


def test_idle_timer_restarts_with_every_command(users: UsersFile) -> None:
    # Commands every 0.1 s for 1 s with a 0.3 s idle timeout: never cut while active
    # (the timer fires meanwhile and follows the later deadline), cut once silent.
    store, stream, session = demo_session(users, idle_timeout=0.3)

    async def busy_client() -> float:
        task = asyncio.create_task(session.run())
        stream.client_sends(b"USER demo\r\nPASS demo\r\n")
        for _ in range(10):
            await asyncio.sleep(0.1)
            stream.client_sends(b"NOOP\r\n")
        last = time.monotonic()
        await asyncio.wait_for(task, 5)
        return time.monotonic() - last

    silent_for = asyncio.run(busy_client())
    out = stream.output.decode()
    assert out.count("+OK\r\n") == 11  # USER and the ten NOOPs
    assert out.endswith(AUTOLOGOUT)
    assert 0.25 < silent_for < 2.0
    assert len(store.contents("demo")) == 1


def test_shutdown_cancel_while_reading_is_not_a_timeout(users: UsersFile) -> None:
    # A cancellation from outside (shutdown after the grace period) propagates; it must not
    # be swallowed as if the session's own deadline had expired.
    store, stream, session = demo_session(users, idle_timeout=5.0)

    async def cancel_it() -> None:
        task = asyncio.create_task(session.run())
        stream.client_sends(b"USER demo\r\nPASS demo\r\nDELE 1\r\n")
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_it())
    assert session.outcome == "shutdown"
    assert len(store.contents("demo")) == 1  # nothing committed
    assert session._timer is None


def test_session_end_leaves_no_timer(users: UsersFile) -> None:
    _, stream, session = demo_session(users)

    async def scenario() -> None:
        stream.client_sends(b"USER demo\r\nPASS demo\r\nQUIT\r\n")
        await asyncio.wait_for(session.run(), 5)
        assert session._timer is None
        # Nothing but the current task is left on the loop.
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(scenario())
    assert session.outcome == "quit"


class StuckReader(MemoryStream):
    """A client that never reads: every drain waits forever."""

    async def drain(self) -> None:
        await asyncio.Event().wait()


def test_drain_waits_no_longer_than_the_idle_timeout(users: UsersFile) -> None:
    # The send side is bounded by the same timer: a client that stops reading is cut.
    store = MemoryStore()
    store.seed("demo", b"one\n")
    stream = StuckReader()
    session = make_session(users, store, stream, login_timeout=0.3, idle_timeout=0.3)
    stream.client_sends(b"USER demo\r\n")
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(session.run(), 10))
    assert session.outcome == "timeout"
    assert time.monotonic() - started < 3.0

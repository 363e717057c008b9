"""Login-defence state shared by every worker: local reads, mutations relayed by the supervisor.

Failure counters, known-good networks and the authentication cache must be
global: an attacker who spreads guesses over N workers must meet the same
delay as one who hits a single worker, and a login cached by one worker
should save Argon2 on every other.  These are maps with expiry and eviction,
so rather than re-implement them in shared memory, every worker keeps the
ordinary in-memory objects (the same classes a single process uses) as a
*replica*: a read (``delay_before_check``) is a local dict lookup with no
round trip, and a change (``record_failure``) is applied locally and
*published*: the supervisor relays it to every other worker over their
socketpairs and keeps it in a journal that it replays to a worker started
later (after a crash), so a restart forgets nothing.  Replicas are behind by
one local message (tens of microseconds), far less than the failure delay
an attacker waits for each answer.  Plain request/answer calls exist too
(``call``: a worker reporting ready).

Wire format, both directions: a 4-octet big-endian length, then a JSON array
``[id, "name", [args...]]``.  ``id`` 0 is a published change (no answer),
``id`` -1 one that is relayed but not journalled (what a restarted worker can
do without, such as authentication-cache entries: they would only crowd the
failure counters out of the bounded journal); otherwise the answer is
``[id, true, result]`` or ``[id, false, "error"]``.
Only names registered in the supervisor can be called, and only names the
worker registered are applied; arguments are plain JSON values.  The
socketpairs are private to the two processes (no path on disk).  A worker
whose supervisor has gone (EOF) stops its service (``StateClient.lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from mailbag.logs import log_event

#: Largest message either side accepts (a few short strings per call).
MAX_MESSAGE = 64 * 1024
#: Changes kept for replay to a worker that starts later (oldest dropped first).
MAX_JOURNAL = 200_000
_LENGTH = struct.Struct(">I")
#: Message id of a change relayed to the other workers but not journalled for later ones.
UNJOURNALLED = -1

Handler = Callable[..., Any]


class StateError(Exception):
    """The supervisor could not answer (gone, or the call failed there)."""


async def _read_message(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(_LENGTH.size)
    (size,) = _LENGTH.unpack(head)
    if size > MAX_MESSAGE:
        raise StateError(f"message of {size} octets is too large")
    return json.loads(await reader.readexactly(size))


def _frame(message: object) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


class StateServer:
    """The supervisor's side: named handlers, one connection per worker."""

    def __init__(self, *, journal_age: Callable[[], float] = lambda: 900.0) -> None:
        self._handlers: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: Published changes (monotonic time, frame), replayed to workers that start later.
        self._journal: deque[tuple[float, bytes]] = deque(maxlen=MAX_JOURNAL)
        self._journal_age = journal_age

    def register(self, name: str, handler: Handler) -> None:
        """Make ``handler`` callable as ``name`` (e.g. ``throttle.record_failure``)."""
        self._handlers[name] = handler

    def connect_worker(self) -> socket.socket:
        """A new socketpair: serve our end; return the end to pass to a worker."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.set_inheritable(True)
        task = asyncio.get_running_loop().create_task(self._serve(ours))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return theirs

    async def _serve(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE + 8)
        self._trim_journal()
        for _, frame in self._journal:  # catch up before anything else
            writer.write(frame)
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await _read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if isinstance(request, list) and request and request[0] in (0, UNJOURNALLED):
                    self._relay(request, writer)
                else:
                    writer.write(_frame(await self._answer(request)))
        except (StateError, ValueError) as exc:
            log_event("state-protocol-error", logging.ERROR, error=str(exc))
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _relay(self, change: Any, sender: asyncio.StreamWriter) -> None:
        """A worker changed shared state: journal it and pass it to every other worker."""
        if not (len(change) == 3 and isinstance(change[1], str) and isinstance(change[2], list)):
            raise StateError("malformed change")
        frame = _frame(change)
        if change[0] == 0:
            self._journal.append((time.monotonic(), frame))
        for writer in self._writers:
            if writer is not sender and not writer.is_closing():
                writer.write(frame)

    def _trim_journal(self) -> None:
        oldest = time.monotonic() - self._journal_age()
        while self._journal and self._journal[0][0] < oldest:
            self._journal.popleft()

    async def _answer(self, request: Any) -> list[Any]:
        if not (isinstance(request, list) and len(request) == 3 and isinstance(request[2], list)):
            raise StateError("malformed request")
        number, name, args = request
        handler = self._handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            return [number, False, f"unknown call {name!r}"]
        try:
            result = handler(*args)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # a bug in a handler must not take the supervisor down
            log_event("state-call-failed", logging.ERROR, call=name, error=repr(exc))
            return [number, False, f"{name} failed"]
        return [number, True, result]

    async def close(self) -> None:
        """Stop serving every worker."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1)


class StateClient:
    """A worker's side: ``await call("throttle.record_failure", address, account)``.

    Calls may overlap (many sessions log in at once); answers are matched by id.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._reader_task: asyncio.Task[None] | None = None
        self._appliers: dict[str, Handler] = {}
        self.lost = asyncio.Event()

    def on_change(self, name: str, apply: Handler) -> None:
        """Apply changes named ``name`` that other workers publish (``apply(*args)``)."""
        self._appliers[name] = apply

    def publish(self, name: str, *args: Any, journal: bool = True) -> None:
        """Tell every other worker (through the supervisor) about a local change.

        ``journal`` False: not replayed to a worker started later.
        """
        if self._writer is not None and not self.lost.is_set():
            self._writer.write(_frame([0 if journal else UNJOURNALLED, name, list(args)]))

    async def start(self) -> None:
        """Connect the stream (in the worker's running loop)."""
        reader, self._writer = await asyncio.open_unix_connection(
            sock=self._sock, limit=MAX_MESSAGE + 8
        )
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                number, ok, result = await _read_message(reader)
                if number in (0, UNJOURNALLED):
                    apply = self._appliers.get(ok) if isinstance(ok, str) else None
                    if apply is not None and isinstance(result, list):
                        try:
                            apply(*result)
                        except Exception as exc:  # one bad change must not cut the link
                            log_event("state-apply-failed", logging.ERROR, change=ok,
                                      error=repr(exc))
                    continue
                future = self._pending.pop(number, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(result)
                else:
                    future.set_exception(StateError(str(result)))
        except (asyncio.IncompleteReadError, ConnectionError, StateError, ValueError):
            pass
        finally:
            self.lost.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(StateError("the supervisor is gone"))
            self._pending.clear()

    def call(self, name: str, *args: Any) -> Awaitable[Any]:
        """Call ``name`` in the supervisor; the awaitable gives its result."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._writer is None or self.lost.is_set():
            future.set_exception(StateError("the supervisor is gone"))
            return future
        self._next += 1
        self._pending[self._next] = future
        self._writer.write(_frame([self._next, name, list(args)]))
        return future

    async def close(self) -> None:
        """Close the connection (the supervisor sees EOF)."""
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()

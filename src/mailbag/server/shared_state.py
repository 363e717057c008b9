"""Login-defence state kept once, in the supervisor, and asked for by the workers.

Failure counters, known-good networks and the authentication cache must be
global: an attacker who spreads guesses over N workers must meet the same
delay as one who hits a single worker, and a login cached by one worker
should save Argon2 on every other.  These are maps with expiry and eviction,
so rather than re-implement them in shared memory, the supervisor keeps the
ordinary in-memory objects (the same classes a single process uses) and each
worker calls them over its own Unix socketpair.  A call costs one local round
trip (tens of microseconds), paid per login attempt, which already costs a
password hash; the per-connection hot path (connection caps) uses shared
memory instead (``server.gate``).

Wire format, both directions: a 4-octet big-endian length, then a JSON array.
Request ``[id, "target.method", [args...]]``; answer ``[id, true, result]`` or
``[id, false, "error text"]``.  Only methods registered by name can be called,
and arguments are plain JSON values, so a compromised worker can do no more
than a worker legitimately can.  The socketpair is private to the two
processes (no path on disk).  A worker whose supervisor has gone (EOF) stops
its service (``StateClient.lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from mailbag.logs import log_event

#: Largest message either side accepts (a few short strings per call).
MAX_MESSAGE = 64 * 1024
_LENGTH = struct.Struct(">I")

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

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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
        try:
            while True:
                try:
                    request = await _read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                writer.write(_frame(await self._answer(request)))
        except (StateError, ValueError) as exc:
            log_event("state-protocol-error", logging.ERROR, error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

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
        self.lost = asyncio.Event()

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

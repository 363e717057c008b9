"""The one asyncio driver for every sans-IO core (POP3, LMTP): the loop, deadlines, endings.

A session subclass supplies the core and the protocol-specific callbacks
(``handle`` for request events, the deadline policy, logging); everything
else is here, once:

* the loop: ``next_event`` -> write replies / hand requests to ``handle`` ->
  ``NeedData`` -> read under the current deadline;
* deadlines: one timer per session, not a timeout context per read.  Each
  wait (a read, or a drain of queued output) only records the time by which
  it must end; the timer, when it fires, compares that with the clock and
  either moves itself to the recorded deadline or ends the wait.  The common
  case, a command answered long before the idle timeout, costs an attribute
  store per wait instead of a timer heap push and cancel (an
  ``asyncio.timeout`` context measured ~7 us, two per command);
* bounded output: replies are batched and written at ``WRITE_HIGH_WATER``
  or before a read, and waiting for the client to take them (``drain``) is
  bounded by ``send_timeout``, so a client that stops reading cannot hold a
  session.  A batch of one small reply (a small RETR: status, body and
  terminator are one reply) goes to the transport as it is, with no copy;
  anything larger is copied into one reused buffer first.  (Handing big
  encoded body chunks to the transport as they are saves a copy but measured
  slower: the transport then holds the encoder's output until it is sent,
  every chunk needs fresh pages, and kernel time for a 1 MiB RETR rose; see
  docs/architecture.md.);
* endings: a timeout or a shutdown request goes to the core as ``Abort`` so
  the client hears why in the protocol's words; after the last reply the
  stream closes with a linger (FIN, then input discarded for a moment), so
  no unread byte turns the close into a reset;
* the crash ladder: an internal error is logged, never shown; the client gets
  the core's generic last words (POP3 ``-ERR [SYS/TEMP]``, LMTP ``421``);
* cancellation (shutdown after the grace period) propagates: nothing after
  it runs, so a cancelled session never commits anything;
* a PROXY header as the first client bytes is refused (closed, one log
  line): a trusted proxy's header was consumed by the listener before the
  session began (``server.proxy_front``), so one seen here comes from a
  client that wants to choose the address we believe it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, cast

from mailbag.logs import log_event
from mailbag.protocol.events import Abort, AbortReason, Close, NeedData, Reply, SansIOCore
from mailbag.protocol.proxy import starts_with_header
from mailbag.session.stream import Stream

#: Flush batched output once it grows past this (a RETR body streams at this granularity).
WRITE_HIGH_WATER = 256 * 1024
#: A batch of one reply up to this size is written as it is; larger output goes through
#: the reused buffer (below glibc's default mmap threshold, so small replies reuse heap).
DIRECT_WRITE_MAX = 64 * 1024
#: After the last reply: how long the socket keeps reading (and discarding) for a clean close.
LINGER_SECONDS = 2.0


class SessionOver(ConnectionError):
    """Ends the session quietly after the outcome was logged (e.g. a failed STLS handshake)."""


class Driver:
    """Run one core over one ``Stream`` until the conversation ends."""

    core: SansIOCore

    def __init__(self, stream: Stream, *, session_id: str) -> None:
        self.stream = stream
        self.session_id = session_id
        self.outcome = "disconnected"
        self.started = time.monotonic()
        self._out: list[bytes] = []
        self._out_size = 0
        self._buffer = bytearray()  # reused for large batches (see the module docstring)
        self._stop = asyncio.Event()
        self._stop_wait: asyncio.Future[Any] | None = None
        self._linger = 0.0
        self._first_read = True
        # The session deadline timer (see the module docstring).
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # monotonic time the timer is due
        self._wait_until: float | None = None  # deadline of the wait in progress
        self._expired = False

    # ------------------------------------------------------- protocol hooks

    async def handle(self, event: object) -> None:
        """Perform the I/O a request event asks for and ``send`` the answer to the core."""
        raise NotImplementedError

    def read_deadline(self) -> float:
        """Absolute ``time.monotonic()`` by which the next bytes must arrive."""
        raise NotImplementedError

    def send_timeout(self) -> float:
        """Seconds the client may take to accept queued output."""
        raise NotImplementedError

    def event_seen(self, event: object) -> None:
        """Called for every event but ``NeedData`` (e.g. to restart an idle timer)."""

    def stoppable(self) -> bool:
        """True when a shutdown request may end the session now (nothing in flight)."""
        return False

    def sent(self, octets: int) -> None:
        """Octets written to the client (metrics)."""

    def on_start(self) -> None:
        """Log the connection."""

    async def on_end(self) -> None:
        """Release resources and log the outcome (the stream is already closed)."""

    def log(self, event: str, level: int = logging.INFO, **fields: object) -> None:
        """One log line for this session."""
        log_event(event, level, session=self.session_id, **fields)

    # ------------------------------------------------------------------ run

    def request_stop(self) -> None:
        """Ask the session to end: at once when ``stoppable``, otherwise when it becomes so."""
        self._stop.set()

    async def run(self) -> None:
        """Run the session; never raises for client behaviour or storage trouble."""
        self.on_start()
        self._task = asyncio.current_task()
        try:
            await self._loop()
        except SessionOver:
            pass
        except (ConnectionError, asyncio.IncompleteReadError):
            self.outcome = "connection lost"
        except TimeoutError:
            self.outcome = "timeout"
        except asyncio.CancelledError:
            self.outcome = "shutdown"
            raise
        except Exception as exc:  # last line of defence: log it, never show it
            self.outcome = "internal error"
            self.log("error", logging.ERROR, error=repr(exc))
            logging.getLogger("mailbag").debug("session crash", exc_info=True)
            await self._last_words()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._stop_wait is not None:
                self._stop_wait.cancel()
            self.stream.close(linger=self._linger)
            await self.on_end()

    async def _loop(self) -> None:
        core = self.core
        next_event = core.next_event
        out = self._out
        while True:
            event = next_event()
            # ``type(...) is`` before ``isinstance``: the loop runs several times per
            # command, and events are final classes.
            kind = type(event)
            if kind is NeedData:
                await self.flush()
                problem = await self._read()
                if problem is not None:
                    core.send(Abort(problem))
                continue
            self.event_seen(event)
            if kind is Reply:
                data = cast(Reply, event).data
                out.append(data)
                self._out_size += len(data)
                if self._out_size >= WRITE_HIGH_WATER:
                    await self.flush()
            elif kind is Close:
                await self.flush()
                reason = cast(Close, event).reason
                if self.outcome == "disconnected" or reason != "client closed the connection":
                    self.outcome = reason
                self._linger = LINGER_SECONDS
                return
            else:
                await self.handle(event)

    # ------------------------------------------------------------ deadlines

    def _wait_begins(self, deadline: float) -> None:
        """A wait that must end by ``deadline`` (``time.monotonic()``) starts now.

        The timer moves only when this deadline is earlier than the one it is
        set for (e.g. the first read after login, when the idle timeout is
        shorter than what is left of the login deadline); a later deadline is
        picked up when the timer fires.
        """
        self._wait_until = deadline
        if deadline < self._timer_at:
            self._set_timer(deadline)

    def _set_timer(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, deadline - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._timer_fired)
        self._timer_at = deadline

    def _timer_fired(self) -> None:
        """End the wait in progress if its deadline has passed; else follow the deadline."""
        self._timer, self._timer_at = None, math.inf
        until = self._wait_until
        if until is None or self._task is None:
            return  # not waiting: the next wait sets the timer again
        if time.monotonic() < until:
            self._set_timer(until)
            return
        # As asyncio.timeout does: cancel the task, and tell our cancellation from
        # any other (a shutdown) with ``uncancel`` where it is caught (``_expired_now``).
        self._expired = True
        self._task.cancel()

    def _expired_now(self) -> bool:
        """In ``except CancelledError``: True if the cancellation was our deadline alone."""
        if not self._expired:
            return False
        self._expired = False
        return self._task is not None and self._task.uncancel() == 0

    async def _read(self) -> AbortReason | None:
        """Wait for client bytes until the deadline; why not, if we could not."""
        deadline = self.read_deadline()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        if not self.stoppable():
            # Neither asyncio.wait_for (a new Task per command) nor asyncio.timeout
            # (a timer pushed and cancelled per command): the session's one timer.
            self._wait_begins(deadline)
            try:
                data = await self.stream.read()
            except asyncio.CancelledError:
                if self._expired_now():
                    return "timeout"
                raise
            finally:
                self._wait_until = None
        else:
            if self._stop.is_set():
                return "shutdown"
            if self._stop_wait is None:
                self._stop_wait = asyncio.ensure_future(self._stop.wait())
            read: asyncio.Future[bytes] = asyncio.ensure_future(self.stream.read())
            done, _ = await asyncio.wait(
                {read, self._stop_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if read not in done:
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read
                return "shutdown" if self._stop.is_set() else "timeout"
            data = read.result()
        if self._first_read:
            self._first_read = False
            if starts_with_header(data):
                self.outcome = "PROXY header from an untrusted address"
                self.log("proxy-refused", logging.WARNING)
                raise SessionOver(self.outcome)
        self.core.receive_data(data)
        return None

    async def flush(self) -> None:
        """Write batched output and wait (bounded) until the client has taken enough of it."""
        out = self._out
        if out:
            size = self._out_size
            if len(out) == 1 and size <= DIRECT_WRITE_MAX:
                data = out[0]
            elif size <= DIRECT_WRITE_MAX:
                data = b"".join(out)
            else:
                buffer = self._buffer
                for part in out:
                    buffer += part
                data = bytes(buffer)
                buffer.clear()
            out.clear()
            self._out_size = 0
            self.stream.write(data)
            self.sent(size)
        # A client that stops reading must not hold the session forever (slowloris on the
        # sending side): waiting for buffer space is bounded like waiting for input.
        self._wait_begins(time.monotonic() + self.send_timeout())
        try:
            await self.stream.drain()
        except asyncio.CancelledError:
            if self._expired_now():
                raise TimeoutError("client did not take output in time") from None
            raise
        finally:
            self._wait_until = None

    async def _last_words(self) -> None:
        """After an internal error: the core's generic goodbye, if the core can still say it."""
        self._out.clear()
        try:
            self.core.send(Abort("internal error"))
            while not isinstance(event := self.core.next_event(), Close | NeedData):
                if isinstance(event, Reply):
                    self.stream.write(event.data)
            self._linger = LINGER_SECONDS
        except Exception:  # the core itself is broken: just close
            logging.getLogger("mailbag").debug("no last words", exc_info=True)

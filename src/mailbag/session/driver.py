"""The one asyncio driver for every sans-IO core (POP3, LMTP): the loop, deadlines, endings.

A session subclass supplies the core and the protocol-specific callbacks
(``handle`` for request events, the deadline policy, logging); everything
else is here, once:

* the loop: ``next_event`` -> write replies / hand requests to ``handle`` ->
  ``NeedData`` -> read under the current deadline;
* bounded output: replies are batched in one reused buffer and written at
  ``WRITE_HIGH_WATER`` or before a read, and waiting for the client to take
  them (``drain``) is bounded by ``send_timeout``, so a client that stops
  reading cannot hold a session.  (Handing each encoded body chunk to the
  transport as it is saves a copy but measured slower: every chunk then needs
  fresh pages, and kernel time for a 1 MiB RETR rose about fourfold.  Copying
  into a reused buffer keeps the encoder's output short-lived and its memory
  warm; see docs/architecture.md.);
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
import time
from typing import Any

from mailbag.logs import log_event
from mailbag.protocol.events import Abort, AbortReason, Close, NeedData, Reply, SansIOCore
from mailbag.protocol.proxy import starts_with_header
from mailbag.session.stream import Stream

#: Flush batched output once it grows past this (a RETR body streams at this granularity).
WRITE_HIGH_WATER = 256 * 1024
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
        self._out = bytearray()
        self._stop = asyncio.Event()
        self._stop_wait: asyncio.Future[Any] | None = None
        self._linger = 0.0
        self._first_read = True

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
            if self._stop_wait is not None:
                self._stop_wait.cancel()
            self.stream.close(linger=self._linger)
            await self.on_end()

    async def _loop(self) -> None:
        core = self.core
        while True:
            event = core.next_event()
            if isinstance(event, NeedData):
                await self.flush()
                problem = await self._read()
                if problem is not None:
                    core.send(Abort(problem))
                continue
            self.event_seen(event)
            if isinstance(event, Reply):
                self._out += event.data
                if len(self._out) >= WRITE_HIGH_WATER:
                    await self.flush()
            elif isinstance(event, Close):
                await self.flush()
                if self.outcome == "disconnected" or event.reason != "client closed the connection":
                    self.outcome = event.reason
                self._linger = LINGER_SECONDS
                return
            else:
                await self.handle(event)

    async def _read(self) -> AbortReason | None:
        """Wait for client bytes until the deadline; why not, if we could not."""
        remaining = self.read_deadline() - time.monotonic()
        if remaining <= 0:
            return "timeout"
        if not self.stoppable():
            try:
                # asyncio.timeout, not wait_for: wait_for wraps the read in a new
                # Task for every command, a measurable cost per RETR and per login.
                async with asyncio.timeout(remaining):
                    data = await self.stream.read()
            except TimeoutError:
                return "timeout"
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
        if self._out:
            self.stream.write(bytes(self._out))
            self.sent(len(self._out))
            self._out.clear()
        # A client that stops reading must not hold the session forever (slowloris on the
        # sending side): waiting for buffer space is bounded like waiting for input.
        async with asyncio.timeout(self.send_timeout()):
            await self.stream.drain()

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

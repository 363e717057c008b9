"""One LMTP session: the short async loop around the sans-IO ``LmtpConnection``.

It reads bytes, feeds the state machine, writes replies, and performs the
I/O the machine asks for: looking up recipients and delivering through the
shared ``DeliveryAgent``.  The rules that keep mail safe:

* nothing is stored before the final dot, so a dropped connection, a
  timeout or a shutdown mid-DATA stores nothing (the MTA retries);
* each recipient gets its own reply, in RCPT order (RFC 2033 section 4.2);
  one account named twice is delivered once and both RCPTs get its reply;
* any internal error becomes ``451 4.3.0`` for every recipient (the MTA
  retries later) and is logged, never shown (DESIGN.md rule 9);
* on shutdown an idle connection gets ``421 4.3.2`` at once, while one in
  the middle of a transaction finishes it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from mailbag.auth.users import UserRecord
from mailbag.errors import AuthError
from mailbag.logs import log_event
from mailbag.protocol.events import Close, NeedData, Reply
from mailbag.protocol.lmtp import (
    SHUTTING_DOWN,
    TIMEOUT,
    CheckRecipient,
    DeliverMessage,
    LmtpConnection,
    LmtpPolicy,
    Status,
)
from mailbag.session.delivery import INTERNAL_ERROR, DeliveryAgent, Envelope, Outcome
from mailbag.session.stream import Stream

#: RFC 5321 section 4.5.3.2.7: a server should wait at least 5 minutes for a command.
DEFAULT_TIMEOUT = 300.0

RECIPIENT_OK = Status(250, "2.1.5", "Recipient OK")
LOOKUP_FAILED = Status(451, "4.3.0", "Temporary lookup failure, try again later")


@dataclass(frozen=True, slots=True)
class LmtpSessionSettings:
    """Per-server settings a session needs (derived from the config)."""

    policy: LmtpPolicy
    timeout: float = DEFAULT_TIMEOUT


class LmtpSession:
    """Serve one LMTP client (an MTA) from greeting to close."""

    def __init__(
        self,
        stream: Stream,
        *,
        settings: LmtpSessionSettings,
        agent: DeliveryAgent,
        session_id: str,
    ) -> None:
        self.stream = stream
        self.settings = settings
        self.agent = agent
        self.session_id = session_id
        address, port = stream.peer
        self.peer = f"{address}:{port}" if address != "?" else "unix"
        self.peer_ip = address if address != "?" else ""
        self.conn = LmtpConnection(settings.policy)
        self.outcome = "disconnected"
        self.delivered = 0
        self._records: dict[str, UserRecord] = {}
        self._out = bytearray()
        self._stop = asyncio.Event()
        self._stop_wait: asyncio.Task[Any] | None = None
        self._started = time.monotonic()

    def _log(self, event: str, level: int = logging.INFO, **fields: object) -> None:
        log_event(event, level, session=self.session_id, peer=self.peer, **fields)

    def request_stop(self) -> None:
        """Ask the session to end: now if idle, else after the current transaction."""
        self._stop.set()

    async def run(self) -> None:
        """Run the session; never raises for client behaviour or storage trouble."""
        self._log("lmtp-connect")
        try:
            await self._loop()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.outcome = "connection lost"
        except asyncio.CancelledError:
            self.outcome = "shutdown"
            raise
        except Exception as exc:  # last line of defence: log it, never show it
            self.outcome = "internal error"
            self._log("error", logging.ERROR, error=repr(exc))
            logging.getLogger("mailbag").debug("lmtp session crash", exc_info=True)
            self._out.clear()
            self.stream.write(Status(421, "4.3.0", "Internal error, closing connection").line())
        finally:
            if self._stop_wait is not None:
                self._stop_wait.cancel()
            self.stream.close()
            self._log("lmtp-disconnect", outcome=self.outcome, delivered=self.delivered,
                      seconds=round(time.monotonic() - self._started, 3))

    async def _flush(self) -> None:
        if self._out:
            self.stream.write(bytes(self._out))
            self._out.clear()
        await self.stream.drain()

    async def _read_more(self) -> str | None:
        """Wait for client bytes; return why we cannot (``timeout``/``stop``) or None."""
        await self._flush()
        timeout = self.settings.timeout
        if not self.conn.idle:
            try:
                data = await asyncio.wait_for(self.stream.read(), timeout)
            except TimeoutError:
                return "timeout"
            self.conn.receive_data(data)
            return None
        if self._stop.is_set():
            return "stop"
        if self._stop_wait is None:
            self._stop_wait = asyncio.ensure_future(self._stop.wait())
        read: asyncio.Task[Any] = asyncio.ensure_future(self.stream.read())
        done, _ = await asyncio.wait(
            {read, self._stop_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if read not in done:
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read
            return "stop" if self._stop.is_set() else "timeout"
        self.conn.receive_data(read.result())
        return None

    async def _loop(self) -> None:
        conn = self.conn
        self._out += conn.greeting()
        while True:
            event = conn.next_event()
            if isinstance(event, NeedData):
                problem = await self._read_more()
                if problem == "timeout":
                    conn.close_with(TIMEOUT, "timeout")
                elif problem == "stop":
                    conn.close_with(SHUTTING_DOWN, "shutdown")
                continue
            if isinstance(event, Reply):
                self._out += event.data
            elif isinstance(event, CheckRecipient):
                conn.recipient_checked(await self._check_recipient(event.address))
            elif isinstance(event, DeliverMessage):
                await self._flush()
                conn.delivery_finished(await self._deliver(event))
                if self._stop.is_set() and conn.idle:
                    conn.close_with(SHUTTING_DOWN, "shutdown")
            elif isinstance(event, Close):
                await self._flush()
                self.outcome = event.reason
                return

    async def _check_recipient(self, address: str) -> Status:
        try:
            record = await self.agent.lookup_async(address)
        except AuthError as exc:
            self._log("auth-error", logging.ERROR, error=str(exc))
            return LOOKUP_FAILED
        if record is None:
            self._log("lmtp-rejected", to=address, reason="unknown user")
            # RFC 3463 X.1.1: bad destination mailbox address.
            return Status(550, "5.1.1", f"<{address}> User unknown")
        self._records[address] = record
        return RECIPIENT_OK

    async def _deliver(self, event: DeliverMessage) -> list[Status]:
        """Deliver once per account (one transaction where the store can); reply per RCPT.

        RFC 2033 section 4.2: one reply per successful RCPT, in RCPT order,
        each saying what became of that recipient's copy; size and quota are
        checked per recipient.
        """
        name_of = {address: self._records[address].name for address in event.recipients}
        first_address: dict[str, str] = {}
        for address in event.recipients:
            first_address.setdefault(name_of[address], address)
        copies = [
            (self._records[address], self._envelope(address, event))
            for address in first_address.values()
        ]
        self._records.clear()
        try:
            results = await self.agent.deliver_all(event.message, copies)
        except Exception as exc:  # a bug: every recipient gets a temporary failure
            self._log("error", logging.ERROR, error=repr(exc))
            return [INTERNAL_ERROR for _ in event.recipients]
        by_name: dict[str, Status] = {}
        for (record, _), result in zip(copies, results, strict=True):
            by_name[record.name] = result.status
            if result.outcome is Outcome.DELIVERED:
                self.delivered += 1
                self._log("lmtp-delivered", user=record.name, sender=event.sender,
                          size=len(event.message), uid=result.uid)
            else:
                self._log("lmtp-rejected", user=record.name, sender=event.sender,
                          reason=result.outcome.value, reply=result.status.code)
        return [by_name[name_of[address]] for address in event.recipients]

    def _envelope(self, address: str, event: DeliverMessage) -> Envelope:
        return Envelope(
            sender=event.sender,
            recipient=address,
            protocol="LMTP",
            helo=event.helo,
            peer=f"[{self.peer_ip}]" if self.peer_ip else "",
            id=self.session_id,
        )

"""One LMTP session: the protocol callbacks around the sans-IO ``LmtpConnection``.

``session.driver.Driver`` runs the loop; this class looks up recipients and
delivers through the shared ``DeliveryAgent``.  The rules that keep mail safe:

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

import logging
import time
from dataclasses import dataclass

from mailbag.auth.users import UserRecord
from mailbag.errors import AuthError
from mailbag.protocol.lmtp import (
    CheckRecipient,
    DeliverMessage,
    DeliveryDone,
    LmtpConnection,
    LmtpPolicy,
    RecipientChecked,
    Status,
)
from mailbag.session.delivery import INTERNAL_ERROR, DeliveryAgent, Envelope, Outcome
from mailbag.session.driver import Driver
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


class LmtpSession(Driver):
    """Serve one LMTP client (an MTA) from greeting to close."""

    def __init__(
        self, stream: Stream, *, settings: LmtpSessionSettings, agent: DeliveryAgent,
        session_id: str,
    ) -> None:
        super().__init__(stream, session_id=session_id)
        self.settings = settings
        self.agent = agent
        address, port = stream.peer
        self.peer = f"{address}:{port}" if address != "?" else "unix"
        self.peer_ip = address if address != "?" else ""
        self.core = self.conn = LmtpConnection(settings.policy)
        self.delivered = 0
        self._records: dict[str, UserRecord] = {}

    # ------------------------------------------------------- driver hooks

    def log(self, event: str, level: int = logging.INFO, **fields: object) -> None:
        super().log(event, level, peer=self.peer, **fields)

    def read_deadline(self) -> float:
        # RFC 5321 section 4.5.3.2: the timeout applies to each read, DATA chunks included.
        return time.monotonic() + self.settings.timeout

    def send_timeout(self) -> float:
        return self.settings.timeout

    def stoppable(self) -> bool:
        return self.conn.idle

    def on_start(self) -> None:
        self.log("lmtp-connect")

    async def on_end(self) -> None:
        self.log("lmtp-disconnect", outcome=self.outcome, delivered=self.delivered,
                 seconds=round(time.monotonic() - self.started, 3))

    async def handle(self, event: object) -> None:
        if isinstance(event, CheckRecipient):
            self.conn.send(RecipientChecked(await self._check_recipient(event.address)))
        elif isinstance(event, DeliverMessage):
            await self.flush()
            self.conn.send(DeliveryDone(await self._deliver(event)))

    async def _check_recipient(self, address: str) -> Status:
        try:
            record = await self.agent.lookup_async(address)
        except AuthError as exc:
            self.log("auth-error", logging.ERROR, error=str(exc))
            return LOOKUP_FAILED
        if record is None:
            self.log("lmtp-rejected", to=address, reason="unknown user")
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
            self.log("error", logging.ERROR, error=repr(exc))
            return [INTERNAL_ERROR for _ in event.recipients]
        by_name: dict[str, Status] = {}
        for (record, _), result in zip(copies, results, strict=True):
            by_name[record.name] = result.status
            if result.outcome is Outcome.DELIVERED:
                self.delivered += 1
                self.log("lmtp-delivered", user=record.name, sender=event.sender,
                          size=len(event.message), uid=result.uid)
            else:
                self.log("lmtp-rejected", user=record.name, sender=event.sender,
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

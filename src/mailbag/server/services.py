"""What a ``Listener`` serves: POP3 or LMTP, as two small specs.

Each spec holds the objects new sessions get (rebuilt at SIGHUP and handed
to ``Listener.reconfigure``), the connection caps, and the line that turns
away a connection over the cap.  LMTP's clients are the local MTA, so its
only cap is a total (beyond it: ``421 4.3.2``, and the MTA retries).
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import time
from dataclasses import dataclass

from mailbag.protocol.lmtp import Status
from mailbag.server.connection import ConnectionStream
from mailbag.server.listeners import ConnectionLimits
from mailbag.server.proxy_front import Network
from mailbag.server.tls import TlsContext
from mailbag.session.authenticate import Authenticator
from mailbag.session.delivery import DeliveryAgent
from mailbag.session.driver import Driver
from mailbag.session.lmtp import LmtpSession, LmtpSessionSettings
from mailbag.session.observer import NULL_OBSERVER, SessionObserver
from mailbag.session.pop3 import Pop3Session, SessionSettings
from mailbag.storage.base import Store

LMTP_TOO_MANY = Status(421, "4.3.2", "Too many connections, try again later")


@dataclass(slots=True)
class Pop3Service:
    """POP3 sessions with these settings, credentials and store."""

    settings: SessionSettings
    authenticator: Authenticator
    store: Store
    limits: ConnectionLimits
    tls: TlsContext | None = None
    observer: SessionObserver = NULL_OBSERVER
    name: str = "pop3"
    refusal: bytes = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
    hostname: str = ""
    #: ``server.trusted_proxies``: peers whose connections start with a PROXY header.
    trusted_proxies: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        # For the APOP timestamp; looked up once, not per connection.
        self.hostname = self.settings.hostname or socket.gethostname() or "localhost"

    @property
    def handshake_timeout(self) -> float:
        """POP3S handshake limit: the login timeout, at most 30 s, at least 1 s."""
        return max(1.0, min(30.0, self.settings.login_timeout))

    def _tls_context(self) -> ssl.SSLContext | None:
        """The context for STLS (``None``: no certificate, so STLS is not offered)."""
        return self.tls.context if self.tls is not None else None

    def session(self, stream: ConnectionStream, number: int) -> Driver:
        return Pop3Session(
            stream,
            settings=self.settings,
            authenticator=self.authenticator,
            store=self.store,
            session_id=f"{number:x}{secrets.token_hex(2)}",
            timestamp=f"<{os.getpid()}.{number}.{int(time.time())}@{self.hostname}>",
            tls_context=self._tls_context,
            observer=self.observer,
        )


@dataclass(slots=True)
class LmtpService:
    """LMTP sessions delivering through this agent."""

    settings: LmtpSessionSettings
    agent: DeliveryAgent
    limits: ConnectionLimits
    name: str = "lmtp"
    refusal: bytes = LMTP_TOO_MANY.line()
    handshake_timeout: float = 30.0
    trusted_proxies: tuple[Network, ...] = ()

    def session(self, stream: ConnectionStream, number: int) -> Driver:
        return LmtpSession(
            stream, settings=self.settings, agent=self.agent,
            session_id=f"L{number:x}{secrets.token_hex(2)}",
        )

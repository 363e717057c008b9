"""Prometheus metrics and a health check, served on their own small HTTP listener.

Why a separate listener: metrics have no authentication and reveal traffic
patterns, so they must never share a port with POP3; the default config
keeps the endpoint off, and the documented address is loopback.  Why our own
tiny asyncio HTTP server rather than ``prometheus_client.start_http_server``:
it binds in the same place and at the same time as the POP3 listeners
(before privileges are dropped, accepting only after), runs on the event
loop instead of a thread, and also answers ``/healthz``, which must work the
same whether or not anybody scrapes metrics.

``prometheus-client`` is an optional dependency (``pip install
'mailbag[metrics]'``).  This module imports it only when a ``Metrics`` is
built, so a server without metrics never needs it, and a config that asks
for metrics without it installed fails with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mailbag import __version__
from mailbag.config import ListenAddress
from mailbag.errors import ConfigError
from mailbag.logs import log_event

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: Buckets for POP3 session length: a fetch takes under a second, an idle
#: client holds its session up to the 10-minute autologout.
SESSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

#: Largest HTTP request head we read; scrapers send a few hundred octets.
MAX_REQUEST_HEAD = 8192
#: Seconds a client gets to send its request.
REQUEST_TIMEOUT = 5.0

#: A health probe: ``(healthy, details)``; details end up as the JSON body.
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


def load_prometheus() -> ModuleType:
    """Import ``prometheus_client`` or explain in one line how to get it."""
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise ConfigError(
            "metrics.listen is set, but the prometheus-client package is not installed; "
            "install it with: pip install 'mailbag[metrics]' (or set metrics.listen = \"\")"
        ) from None


class Metrics:
    """Every metric mailbag exports, in a private registry.

    Implements the session's and the server's observer interfaces
    (``session.pop3.SessionObserver``, ``server.listeners.ServerObserver``)
    structurally, so neither layer imports this module.  Label values are
    bounded sets chosen by the server (command names from the command table,
    mechanism names from the offered list), never text a client chose.
    """

    def __init__(self) -> None:
        prom = load_prometheus()
        self._prom = prom
        registry: CollectorRegistry = prom.CollectorRegistry(auto_describe=True)
        self.registry = registry
        with contextlib.suppress(Exception):  # /proc may be unavailable (containers, BSD)
            prom.ProcessCollector(registry=registry)
        info = prom.Info("mailbag", "mailbag build information", registry=registry)
        info.info({"version": __version__})
        self.connections_current = prom.Gauge(
            "mailbag_connections_current", "POP3 connections open now", registry=registry
        )
        self.connections = prom.Counter(
            "mailbag_connections", "POP3 connections accepted", registry=registry
        )
        self.refused = prom.Counter(
            "mailbag_connections_refused",
            "POP3 connections refused by the connection limits",
            registry=registry,
        )
        self.logins = prom.Counter(
            "mailbag_logins",
            "POP3 login attempts by result (ok, failed, in_use, error) and mechanism",
            ["result", "mechanism"],
            registry=registry,
        )
        self.commands_total = prom.Counter(
            "mailbag_commands", "POP3 commands received, by name", ["command"], registry=registry
        )
        self.sent_bytes = prom.Counter(
            "mailbag_sent_bytes", "Octets sent to POP3 clients", registry=registry
        )
        self.deliveries = prom.Counter(
            "mailbag_deliveries",
            "Messages delivered into Maildirs by this process, by result",
            ["result"],
            registry=registry,
        )
        self.session_seconds = prom.Histogram(
            "mailbag_session_duration_seconds",
            "Length of POP3 sessions from connect to close",
            buckets=SESSION_BUCKETS,
            registry=registry,
        )
        self.storage_errors = prom.Counter(
            "mailbag_storage_errors",
            "Storage failures seen by POP3 sessions, by operation",
            ["operation"],
            registry=registry,
        )
        self.reloads = prom.Counter(
            "mailbag_config_reloads", "SIGHUP reloads by result (ok, failed)", ["result"],
            registry=registry,
        )
        self.auth_cache_lookups = prom.Counter(
            "mailbag_auth_cache",
            "Authentication cache lookups for a password login, by result (hit, miss)",
            ["result"],
            registry=registry,
        )
        # Series that exist from the start at 0, so rate() and alerts work before the first event.
        for result in ("hit", "miss"):
            self.auth_cache_lookups.labels(result=result)
        for operation in ("open", "read", "delete", "close"):
            self.storage_errors.labels(operation=operation)
        for result in ("delivered", "rejected", "failed"):
            self.deliveries.labels(result=result)
        for result in ("ok", "failed"):
            self.reloads.labels(result=result)
        self.started = prom.Gauge(
            "mailbag_start_time_seconds", "Unix time the server started", registry=registry
        )
        self.started.set(time.time())

    # -- ServerObserver ------------------------------------------------------

    def connection_opened(self) -> None:
        """A connection was accepted and its session started."""
        self.connections.inc()
        self.connections_current.inc()

    def connection_closed(self) -> None:
        """A session ended."""
        self.connections_current.dec()

    def connection_refused(self) -> None:
        """A connection was turned away by the connection limits."""
        self.refused.inc()

    # -- SessionObserver -----------------------------------------------------

    def login(self, result: str, mechanism: str) -> None:
        """One login attempt finished."""
        self.logins.labels(result=result, mechanism=mechanism).inc()

    def commands(self, counts: Mapping[str, int]) -> None:
        """Commands one session received (reported when it ends)."""
        for name, count in counts.items():
            self.commands_total.labels(command=name).inc(count)

    def sent(self, octets: int) -> None:
        """Octets written to a client."""
        self.sent_bytes.inc(octets)

    def storage_error(self, operation: str) -> None:
        """A storage operation failed (open, read, delete, close)."""
        self.storage_errors.labels(operation=operation).inc()

    def session_ended(self, seconds: float) -> None:
        """A session lasted ``seconds``."""
        self.session_seconds.observe(seconds)

    # -- others --------------------------------------------------------------

    def delivery(self, result: str) -> None:
        """A delivery finished (for an in-process delivery service such as LMTP)."""
        self.deliveries.labels(result=result).inc()

    def auth_cache(self, result: str) -> None:
        """An authentication-cache lookup (``session.authenticate.AuthObserver``)."""
        self.auth_cache_lookups.labels(result=result).inc()

    def reload(self, result: str) -> None:
        """A SIGHUP reload was applied (``ok``) or rejected (``failed``)."""
        self.reloads.labels(result=result).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        prom = self._prom
        return prom.generate_latest(self.registry), str(prom.CONTENT_TYPE_LATEST)


def _response(status: str, content_type: str, body: bytes, *, head: bool = False) -> bytes:
    header = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return header if head else header + body


class OpsEndpoint:
    """HTTP/1.1 on one address: ``GET /metrics``, ``GET /healthz``; one request per connection.

    ``/healthz`` answers 200 with a small JSON document while the server is
    healthy and 503 otherwise (stopping, mail root unwritable, users file
    unreadable), which is what load balancers and monitoring systems poll.
    ``metrics`` may be None, then ``/metrics`` is 404 and only health works.
    """

    def __init__(
        self, address: ListenAddress, metrics: Metrics | None, health: HealthCheck
    ) -> None:
        self.address = address
        self.metrics = metrics
        self.health = health
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the configured port was 0)."""
        if self._server is None or not self._server.sockets:
            return self.address.port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, *, accept: bool = True) -> None:
        """Bind (accepting now, or only after ``accept``); a bind error is a ConfigError."""
        try:
            self._server = await asyncio.start_server(
                self._handle,
                self.address.host,
                self.address.port,
                reuse_address=True,
                start_serving=accept,
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen: cannot listen on {self.address}: {exc.strerror or exc}"
            ) from None
        log_event("listening", address=str(self.address), service="metrics")

    async def accept(self) -> None:
        """Start accepting (after privileges were dropped)."""
        if self._server is not None:
            await self._server.start_serving()

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            writer.write(self._answer(head))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            with contextlib.suppress(ConnectionError):
                writer.write(_response("400 Bad Request", "text/plain", b"bad request\n"))
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> bytes:
        if len(head) > MAX_REQUEST_HEAD:
            return _response("431 Request Header Fields Too Large", "text/plain", b"too large\n")
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            return _response("400 Bad Request", "text/plain", b"bad request\n")
        method, target, _version = parts
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", "text/plain", b"GET or HEAD\n")
        is_head = method == b"HEAD"
        path = target.split(b"?", 1)[0]
        if path == b"/healthz":
            healthy, details = self.health()
            body = (json.dumps(details, sort_keys=True) + "\n").encode()
            status = "200 OK" if healthy else "503 Service Unavailable"
            return _response(status, "application/json", body, head=is_head)
        if path == b"/metrics" and self.metrics is not None:
            body, content_type = self.metrics.render()
            return _response("200 OK", content_type, body, head=is_head)
        return _response("404 Not Found", "text/plain", b"try /metrics or /healthz\n",
                         head=is_head)

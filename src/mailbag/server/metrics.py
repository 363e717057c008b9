"""Prometheus metrics and a health check, served on their own small HTTP listener.

Why a separate listener: metrics have no authentication and reveal traffic
patterns, so they must never share a port with POP3; the default config
keeps the endpoint off, and the documented address is loopback.  The HTTP
is not ours: the standard library's WSGI server serves prometheus-client's
exposition app (``make_wsgi_app``) beside a ``/healthz`` route, in threads
of its own, so scrapes stay off the event loop.  Unlike
``prometheus_client.start_http_server`` it binds with the POP3 listeners,
before privileges are dropped, and serves only after.

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
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mailbag import __version__
from mailbag.config import ListenAddress
from mailbag.errors import ConfigError
from mailbag.logs import log_event

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from prometheus_client import CollectorRegistry

#: Buckets for POP3 session length: a fetch takes under a second, an idle
#: client holds its session up to the 10-minute autologout.
SESSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

#: Seconds a client gets for each read of its request.
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

    def wsgi_app(self) -> WSGIApplication:
        """prometheus-client's exposition app for this registry (what ``/metrics`` runs)."""
        app: WSGIApplication = self._prom.make_wsgi_app(self.registry)
        return app


class _HttpServer(socketserver.ThreadingMixIn, WSGIServer):
    """The standard library's WSGI server, one short-lived thread per request."""

    daemon_threads = True  # a hung scraper never blocks shutdown


class _IPv6HttpServer(_HttpServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Request handling without access lines on stderr (the log is structured JSON/text)."""

    timeout = REQUEST_TIMEOUT  # seconds a client gets per read: slow clients are cut

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


def _plain(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


class OpsEndpoint:
    """HTTP on one address: ``GET /metrics`` and ``GET /healthz``.

    HTTP itself is the standard library's (``wsgiref``) and ``/metrics`` is
    prometheus-client's own exposition app (``make_wsgi_app``: content
    negotiation, OpenMetrics, gzip); this class only routes.  It runs in its
    own threads, so a scrape never competes with POP3 sessions for the event
    loop.  ``/healthz`` answers 200 with a small JSON document while the
    server is healthy and 503 otherwise (stopping, mail storage unusable,
    users file unreadable), which is what load balancers and monitoring
    systems poll.  ``metrics`` may be None, then ``/metrics`` is 404 and
    only health works.
    """

    def __init__(
        self, address: ListenAddress, metrics: Metrics | None, health: HealthCheck
    ) -> None:
        self.address = address
        self.metrics = metrics
        self.health = health
        self._exposition: WSGIApplication | None = (
            metrics.wsgi_app() if metrics is not None else None
        )
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the configured port was 0)."""
        if self._httpd is None:
            return self.address.port
        return int(self._httpd.server_address[1])

    async def start(self, *, accept: bool = True) -> None:
        """Bind now (before privileges are dropped); serve now or only after ``accept``.

        A bind error is a ConfigError naming the setting.
        """
        host = self.address.host
        server_class = _IPv6HttpServer if ":" in host else _HttpServer
        try:
            self._httpd = make_server(host, self.address.port, self._app,
                                      server_class=server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen: cannot listen on {self.address}: {exc.strerror or exc}"
            ) from None
        log_event("listening", address=str(self.address), service="metrics")
        if accept:
            await self.accept()

    async def accept(self) -> None:
        """Start serving (after privileges were dropped), in a thread of its own."""
        if self._httpd is not None and self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                name="mailbag-metrics", daemon=True,
            )
            self._thread.start()

    async def close(self) -> None:
        """Stop listening (waits for the serving thread, off the event loop)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        if self._thread is not None:
            await asyncio.to_thread(httpd.shutdown)
            self._thread = None
        httpd.server_close()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Route: ``/healthz`` here, ``/metrics`` to prometheus-client, the rest 404."""
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
                return [b""]
            healthy, details = self.health()
            body = (json.dumps(details, sort_keys=True) + "\n").encode()
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body))),
                                    ("Cache-Control", "no-store")])
            return [b"" if method == "HEAD" else body]
        if path == "/metrics" and self._exposition is not None:
            return self._exposition(environ, start_response)
        return _plain(start_response, "404 Not Found", "try /metrics or /healthz\n")

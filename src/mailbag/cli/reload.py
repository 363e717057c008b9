"""Running ``mailbag serve`` as a service: binding, privilege drop, SIGHUP reload, health.

Kept out of ``serve_cmd`` so the serve loop stays short.

Reload (SIGHUP) re-reads the config file, the users file and the TLS
certificate.  Everything is built and validated *before* anything is
swapped in, so a bad new config (a typo, a missing certificate, an
unreadable users file) is rejected with one ``reload-failed`` log line naming
the key or path, and the old config stays in force.  Open sessions keep the
objects they started with and are never dropped; new sessions get the new
settings, on every listener: POP3 and LMTP (``[lmtp]`` timeouts and
caps, ``[quota]``, ``storage.max_message_size``).  Some settings cannot
change without a restart (``RESTART_ONLY``: the sockets of every listener,
``[process]``, ``[metrics]``): a changed value there is logged as a warning
and ignored until then.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from mailbag import __version__
from mailbag.cli.wiring import (
    Runtime,
    build_runtime,
    lmtp_service,
    pop3_service,
    store_problems,
)
from mailbag.config import Config
from mailbag.errors import ConfigError, MailbagError
from mailbag.logs import log_event, setup_logging
from mailbag.server.listeners import Listener
from mailbag.server.metrics import Metrics, OpsEndpoint
from mailbag.server.privileges import Account, check_start, describe, drop

#: Settings a reload cannot apply (sockets of every listener, process, metrics endpoint);
#: a change is reported and waits for a restart.
RESTART_ONLY = (
    "listen", "lmtp.listen", "lmtp.socket", "lmtp.socket_mode", "process", "metrics", "workers",
)


def _get(config: Config, name: str) -> Any:
    section, _, key = name.partition(".")
    value = getattr(config, section)
    return getattr(value, key) if key else value


def _keep_restart_only(old: Config, new: Config) -> Config:
    """``new`` with every restart-only setting as it is in ``old`` (the state really in force)."""
    for name in RESTART_ONLY:
        section, _, key = name.partition(".")
        if key:
            value = dataclasses.replace(getattr(new, section), **{key: _get(old, name)})
        else:
            value = getattr(old, section)
        new = dataclasses.replace(new, **{section: value})
    return new


def check_runtime_access(runtime: Runtime, *, after_drop: Account | None) -> None:
    """After the privilege drop: can this process still do its job?

    Fatal when it cannot store mail or read the users file (nobody could log
    in); a warning when the TLS key is unreadable, because then only the next
    SIGHUP would fail (a root-only Let's Encrypt key is the classic case).
    """
    config = runtime.config
    who = after_drop.user if after_drop is not None else "the server's user"
    for problem in store_problems(runtime.store):
        raise ConfigError(f"storage: {problem} by {who}")
    users = config.auth.users_file
    if config.auth.backend == "file" and users.exists() and not os.access(users, os.R_OK):
        raise ConfigError(f"auth.users_file: {users} is not readable by {who}")
    for label, path in (("tls.cert", config.tls.cert), ("tls.key", config.tls.key)):
        if path is not None and not os.access(path, os.R_OK):
            log_event(
                "warning", logging.WARNING,
                problem=f"{label}: {path} is not readable by {who}; a SIGHUP reload will fail",
            )


def health_problems(runtime: Runtime) -> list[str]:
    """What would keep this server from working now (for ``/healthz``); cheap."""
    problems = list(store_problems(runtime.store))
    config = runtime.config
    users = config.auth.users_file
    try:
        if config.auth.backend == "file" and not os.access(users, os.R_OK):
            problems.append(f"users file {users} not readable")
    except OSError as exc:  # pragma: no cover - access() does not raise in practice
        problems.append(f"users file {users}: {exc}")
    return problems


async def bind_and_drop(
    runtime: Runtime, listeners: Sequence[Listener], ops: OpsEndpoint | None, *, accept: bool
) -> Account | None:
    """Bind every listener and the metrics endpoint, drop root, check access; then accept.

    The one start-up sequence of a single process (``accept=True``) and of the
    worker supervisor (``accept=False``: it binds for its workers and never
    accepts itself): nothing is read from the network before the drop.  On any
    failure whatever was bound is closed again.
    """
    try:
        for listener in listeners:
            await listener.start(accept=False)
        if ops is not None:
            await ops.start(accept=False)
        account = check_start(runtime.config.process)
        drop_privileges(account)
        check_runtime_access(runtime, after_drop=account)
        if accept:
            for listener in listeners:
                await listener.accept()
            if ops is not None:
                await ops.accept()
    except BaseException:
        await close_all(listeners, ops)
        raise
    return account


async def close_all(listeners: Sequence[Listener], ops: OpsEndpoint | None) -> None:
    """Stop listening everywhere (open sessions are not touched: see ``Listener.shutdown``)."""
    for listener in listeners:
        await listener.close_listeners()
    if ops is not None:
        await ops.close()


def drop_privileges(account: Account | None) -> None:
    """Switch to ``account`` (if any) and log who the server now runs as."""
    if account is not None:
        drop(account)
    log_event("running-as", identity=describe())


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    return [name for name in RESTART_ONLY if _get(old, name) != _get(new, name)]


class Service:
    """The live state ``serve`` manages: current config, runtime, server, health."""

    def __init__(
        self,
        runtime: Runtime,
        server: Listener,
        *,
        load_config: Callable[[], Config] | None,
        metrics: Metrics | None = None,
        lmtp: Listener | None = None,
    ) -> None:
        self.runtime = runtime
        self.server = server
        self.lmtp = lmtp
        self.load_config = load_config
        self.metrics = metrics
        self.stopping = False
        self.started = time.time()
        self.reloads = 0

    @property
    def config(self) -> Config:
        """The config in force."""
        return self.runtime.config

    # -- reload ----------------------------------------------------------------

    def reload(self) -> bool:
        """Handle SIGHUP: apply a new config, or keep the old one and say why."""
        try:
            if self.load_config is None:
                raise ConfigError("no config file to reload")
            new = self.load_config()
            self._apply(new)
        except (MailbagError, OSError) as exc:
            log_event("reload-failed", logging.ERROR, error=str(exc),
                      kept=str(self.config.path or "defaults"))
            if self.metrics is not None:
                self.metrics.reload("failed")
            return False
        self.reloads += 1
        if self.metrics is not None:
            self.metrics.reload("ok")
        log_event("reloaded", config=str(self.config.path or "defaults"),
                  users=str(self.config.auth.users_file),
                  tls="yes" if self.runtime.tls is not None else "no")
        return True

    def _apply(self, new: Config) -> None:
        old_runtime = self.runtime
        for name in _restart_only_changes(old_runtime.config, new):
            log_event("reload-needs-restart", logging.WARNING, setting=name,
                      note="changed in the file; takes effect after a restart")
        # Keep restart-only settings as they are, so the state we report is the real one.
        new = _keep_restart_only(old_runtime.config, new)
        if new.auth.known_good_file != old_runtime.config.auth.known_good_file:
            log_event("reload-needs-restart", logging.WARNING, setting="auth.known_good_file",
                      note="changed in the file; takes effect after a restart")
            new = dataclasses.replace(new, auth=dataclasses.replace(
                new.auth, known_good_file=old_runtime.config.auth.known_good_file))
        # 1. Build and validate everything; nothing live changes yet.  The login
        # defence's state (failure counters, known-good networks) carries over, or a
        # reload would reset an attack's delay; the new policy applies to it at once.
        # The store carries over too when its settings did not change: a new one
        # would mean a second pool and, on PostgreSQL, a second lease owner id.
        old = old_runtime.config
        same_store = (new.storage, new.database, new.hostname) == (
            old.storage, old.database, old.hostname)
        candidate = build_runtime(new, defence=old_runtime.defence,
                                  auth_cache=old_runtime.auth_cache,
                                  store=old_runtime.store if same_store else None)
        candidate.users.reload()  # AuthError now, not at the first login
        if candidate.users.problems:
            for problem in candidate.users.problems:
                log_event("users-file-problem", logging.WARNING, problem=problem)
        live_tls = old_runtime.tls
        if live_tls is not None and candidate.tls is None:
            log_event("reload-needs-restart", logging.WARNING, setting="tls",
                      note="TLS cannot be switched off while TLS listeners run")
            candidate.tls = live_tls
        # A new authenticator, so a new (empty) authentication cache: SIGHUP drops it.
        staged = pop3_service(candidate, self.metrics)
        # 2. Swap.  The live TLS context object is kept (listeners hold it) and
        # gets the new chain; the candidate context proved it loads.
        if live_tls is not None and candidate.tls is not None and candidate.tls is not live_tls:
            live_tls.cert, live_tls.key = candidate.tls.cert, candidate.tls.key
            live_tls.reload()
            candidate.tls = live_tls
        staged.tls = candidate.tls
        self.server.reconfigure(staged, tls=candidate.tls)
        if self.lmtp is not None:
            self.lmtp.reconfigure(lmtp_service(candidate, self.metrics))
        self.runtime = candidate
        setup_logging(new.log_level, new.log_format)

    # -- health ------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """What ``/healthz`` reports; cheap (a few ``access`` calls) so it can be polled often."""
        problems = health_problems(self.runtime)
        status = "stopping" if self.stopping else ("degraded" if problems else "ok")
        details: dict[str, Any] = {
            "status": status,
            "version": __version__,
            "sessions": self.server.active_sessions,
            "uptime_seconds": round(time.time() - self.started, 1),
            "reloads": self.reloads,
        }
        if problems:
            details["problems"] = problems
        return status == "ok", details


"""``mailbag serve`` with ``server.workers`` > 1: the supervisor, and a worker's link to it.

The supervisor binds every listener exactly as a single process would (the
same listener classes, checks and messages), drops privileges, then hands
the bound sockets to N workers (``server.supervisor``) and never accepts on
them itself.  It keeps what must be global: the shared connection table
(``server.gate``), the login-defence state (``server.shared_state``), the
summed metrics and ``/healthz`` (``server.worker_metrics``).

A worker is ``mailbag serve`` started with ``$MAILBAG_WORKER`` set: it reads
the same config file and runs the ordinary serve loop around the inherited
sockets (``WorkerLink``), without binding and without privileges to drop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailbag import __version__
from mailbag.cli.reload import bind_and_drop, close_all, health_problems
from mailbag.cli.wiring import (
    build_defence_state,
    build_lmtp_server,
    build_runtime,
    build_server,
    uses_database,
)
from mailbag.config import Config, ListenAddress, parse_listen, worker_count
from mailbag.errors import ConfigError, MailbagError
from mailbag.logs import log_event, set_process_fields
from mailbag.server.gate import SharedCounts, SharedGate
from mailbag.server.metrics import OpsEndpoint
from mailbag.server.privileges import Account
from mailbag.server.replicated_defence import (
    ReplicatedCache,
    ReplicatedCounters,
    ReplicatedKnownNetworks,
)
from mailbag.server.shared_state import StateClient, StateServer
from mailbag.server.supervisor import InheritedSocket, Supervisor, WorkerSpec
from mailbag.server.worker_metrics import MULTIPROC_ENV, WorkersExposition
from mailbag.session.throttle import DefenceState

#: The supervisor call that gives a worker the authentication cache's key.
CACHE_KEY = "supervisor.cache_key"


def worker_command(args: argparse.Namespace, config: Config) -> list[str]:
    """The command line a worker is started with: this ``serve`` with the same overrides."""
    command = [sys.executable, "-m", "mailbag", "serve"]
    if config.path is not None:
        command += ["-c", str(config.path)]
    for value in getattr(args, "listen", None) or ():
        command += ["--listen", value]
    for value in getattr(args, "listen_tls", None) or ():
        command += ["--listen-tls", value]
    if getattr(args, "log_format", None):
        command += ["--log-format", args.log_format]
    if getattr(args, "log_level", None):
        command += ["--log-level", args.log_level]
    if getattr(args, "allow_root", False):
        command.append("--allow-root")
    return command


# -- the supervisor -------------------------------------------------------------------


def check_can_start_workers(command: list[str], account: Account | None) -> None:
    """After the drop: can this process still start (and later restart) a worker?

    Workers are exec'd by the unprivileged supervisor, so the interpreter must
    be executable by ``process.user``: a virtualenv under ``/root`` is not.
    """
    if not os.access(command[0], os.X_OK):
        who = account.user if account is not None else "the server's user"
        raise ConfigError(
            f"server.workers: {who} cannot run {command[0]}, so no worker could start; "
            "install mailbag where that user can run it, or set server.workers = 1"
        )


def _roles(config: Config) -> list[str]:
    """What each bound socket is, in the order the listeners bind them."""
    roles = [f"{'pop3s' if a.tls else 'pop3'} {a}" for a in config.listen]
    roles += [f"lmtp {a}" for a in config.lmtp.listen]
    if config.lmtp.socket is not None:
        roles.append(f"lmtp-unix {config.lmtp.socket}")
    return roles


async def supervise(
    config: Config,
    *,
    command: list[str],
    reload_config: Callable[[], Config] | None = None,
) -> None:
    """Bind, drop privileges, run the workers until SIGTERM/SIGINT, then drain them."""
    set_process_fields(worker="supervisor")
    os.umask(config.process.umask)
    count = worker_count(config)
    runtime = build_runtime(config)
    if any(a.tls for a in config.listen) and runtime.tls is None:
        raise ConfigError("server.listen_tls: needs tls.cert and tls.key")
    server = build_server(runtime)
    lmtp = build_lmtp_server(runtime)
    listeners = [server] if lmtp is None else [server, lmtp]
    ops: OpsEndpoint | None = None
    if config.metrics.listen:
        address = parse_listen(config.metrics.listen, key="metrics.listen")
        ops = OpsEndpoint(address, None, lambda: (False, {}))
    account = await bind_and_drop(runtime, listeners, ops, accept=False)
    try:
        check_can_start_workers(command, account)
        bound = [sock for listener in listeners for sock in listener.listening_sockets()]
    except BaseException:
        await close_all(listeners, ops)
        raise
    sockets = [InheritedSocket(s.fileno(), role) for s, role in zip(bound, _roles(config),
                                                                    strict=True)]
    counts = SharedCounts.create(count)
    # Failure counters are replayed to a restarted worker for as long as they count.
    state = StateServer(journal_age=lambda: current.auth.failure_window)
    # One authentication-cache key for every worker, so an entry made by one is valid in all.
    cache_key = secrets.token_bytes(32).hex()
    state.register(CACHE_KEY, lambda: cache_key)
    exposition: WorkersExposition | None = None
    env = dict(os.environ)
    supervisor: Supervisor | None = None

    def status() -> tuple[int, int, int]:
        return (supervisor.running, count, supervisor.restarts) if supervisor else (0, count, 0)

    if ops is not None:
        exposition = WorkersExposition(status)
        env[MULTIPROC_ENV] = str(exposition.directory)
    supervisor = Supervisor(
        count=count, command=command, sockets=sockets, counts=counts, state=state,
        grace=lambda: current.limits.shutdown_grace, env=env,
        on_worker_exit=exposition.worker_exited if exposition is not None else None,
    )
    current = config
    started = time.time()
    stopping = False

    def health() -> tuple[bool, dict[str, Any]]:
        assert supervisor is not None
        problems = health_problems(runtime)
        if supervisor.running < count:
            problems.append(f"{count - supervisor.running} of {count} workers not running")
        status_text = "stopping" if stopping else ("degraded" if problems else "ok")
        details: dict[str, Any] = {
            "status": status_text, "version": __version__, "workers": supervisor.running,
            "sessions": counts.grand_total(), "restarts": supervisor.restarts,
            "uptime_seconds": round(time.time() - started, 1),
        }
        if problems:
            details["problems"] = problems
        return status_text == "ok", details

    def reload() -> None:
        nonlocal current
        try:
            if reload_config is None:
                raise ConfigError("no config file to reload")
            current = reload_config()
        except (MailbagError, OSError) as exc:
            log_event("reload-failed", logging.ERROR, error=str(exc),
                      kept=str(current.path or "defaults"), note="not passed to the workers")
            return
        log_event("reload", workers=supervisor.running if supervisor else 0)
        if supervisor is not None:
            supervisor.reload()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        await supervisor.start()
        if ops is not None:
            ops.use(exposition, health)
            await ops.accept()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        await stop.wait()
        stopping = True
        log_event("stopping", sessions=counts.grand_total(), workers=supervisor.running)
    finally:
        if ops is not None:
            await ops.close()
        await supervisor.stop()
        await close_all(listeners, ops)
        for sock in bound:
            sock.close()
        counts.close()
        if exposition is not None:
            exposition.close()
        log_event("stopped")


# -- a worker ---------------------------------------------------------------------------


def worker_config(config: Config, spec: WorkerSpec) -> Config:
    """The config with the supervisor's listeners (restart-only: the file may have changed)."""
    listen: list[ListenAddress] = []
    lmtp_listen: list[ListenAddress] = []
    lmtp_socket = None
    for inherited in spec.sockets:
        kind, _, where = inherited.role.partition(" ")
        if kind in ("pop3", "pop3s"):
            listen.append(parse_listen(where, tls=kind == "pop3s"))
        elif kind == "lmtp":
            lmtp_listen.append(parse_listen(where))
        elif kind == "lmtp-unix":
            lmtp_socket = Path(where)
    lmtp = dataclasses.replace(config.lmtp, listen=tuple(lmtp_listen), socket=lmtp_socket)
    return dataclasses.replace(config, listen=tuple(listen), lmtp=lmtp, workers=spec.count)


class WorkerLink:
    """A worker's connection to its supervisor: shared counts, shared state, sockets."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.gate = SharedGate(SharedCounts.attach(spec.counts_fd), spec.number - 1)
        self.state = StateClient(socket.socket(fileno=spec.state_fd))
        self.sockets = [socket.socket(fileno=s.fd) for s in spec.sockets]
        self.cache_key = b""

    @classmethod
    async def open(cls, spec: WorkerSpec) -> WorkerLink:
        """Attach to what the supervisor passed (in the worker's loop)."""
        set_process_fields(worker=spec.number)
        link = cls(spec)
        await link.state.start()
        link.cache_key = bytes.fromhex(await link.state.call(CACHE_KEY))
        return link

    def pop3_sockets(self) -> list[socket.socket]:
        """The POP3 listening sockets, in ``config.listen`` order."""
        return [sock for sock, s in zip(self.sockets, self.spec.sockets, strict=True)
                if s.role.startswith("pop3")]

    def lmtp_sockets(self) -> list[socket.socket]:
        """The LMTP listening sockets (TCP first, then the Unix socket)."""
        return [sock for sock, s in zip(self.sockets, self.spec.sockets, strict=True)
                if s.role.startswith("lmtp")]

    def defence_state(self, config: Config) -> DefenceState:
        """The login defence's state, shared with every other worker (see
        ``server.replicated_defence``): failure counters and known-good networks."""
        local = build_defence_state(config)
        if uses_database(config):  # already shared by every node, workers included
            return local
        return DefenceState(
            ReplicatedCounters(self.state, local.counters),
            ReplicatedKnownNetworks(self.state, local.known),
        )

    def auth_cache(self, ttl: float, max_entries: int) -> ReplicatedCache:
        """The authentication cache, its entries shared with every other worker."""
        return ReplicatedCache(self.state, ttl, max_entries=max_entries, key=self.cache_key)

    async def ready(self) -> None:
        """Tell the supervisor this worker accepts connections."""
        await self.state.call("supervisor.ready", self.spec.number, os.getpid())
        log_event("worker-ready", pid=os.getpid())

    async def close(self) -> None:
        """Detach (the supervisor sees EOF on our state socket)."""
        await self.state.close()
        with contextlib.suppress(OSError):
            self.gate.counts.close()

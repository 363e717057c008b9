"""``mailbag serve``: run the POP3 server in the foreground until SIGTERM/SIGINT.

SIGTERM or SIGINT stops accepting, gives open sessions ``limits.shutdown_grace``
seconds, then cancels what is left; a cancelled session never applies its
deletions.  SIGHUP reloads the config file, the users file and the TLS
certificate without touching open sessions (see ``cli.reload``).

Start-up order: bind the POP3 and metrics listeners without accepting, drop
root privileges, check the unprivileged process can reach its files, then
accept, so no POP3 byte is ever read as root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import Callable
from typing import Any

from mailbag.cli.common import add_config_option, config_from_args
from mailbag.cli.reload import Service, bind_and_drop
from mailbag.cli.supervise import WorkerLink, supervise, worker_command, worker_config
from mailbag.cli.wiring import (
    Runtime,
    build_lmtp_server,
    build_runtime,
    build_server,
    check_backend_schema,
    close_backend,
)
from mailbag.config import Config, parse_listen, worker_count
from mailbag.errors import ConfigError
from mailbag.logs import log_event, setup_logging
from mailbag.server.metrics import Metrics, OpsEndpoint
from mailbag.server.supervisor import WorkerSpec
from mailbag.server.worker_metrics import MULTIPROC_ENV


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` command."""
    parser = subparsers.add_parser(
        "serve",
        help="run the POP3 server in the foreground",
        description="Run the POP3 server in the foreground, logging to stderr. "
        "SIGTERM/SIGINT stop it gracefully; SIGHUP reloads the config, the users file "
        "and the TLS certificate. Started as root, it drops to process.user after binding.",
    )
    add_config_option(parser)
    parser.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="plain POP3 listener, replacing server.listen (repeatable)",
    )
    parser.add_argument(
        "--listen-tls",
        action="append",
        metavar="HOST:PORT",
        help="implicit-TLS listener, replacing server.listen_tls (repeatable)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), help="override log.format")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="override log.level"
    )
    parser.add_argument(
        "--allow-root",
        action="store_true",
        help="serve as root when no process.user is set (same as process.allow_root = true)",
    )
    parser.set_defaults(handler=run)


def apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    """Command-line flags win over the file."""
    changes: dict[str, Any] = {}
    if args.listen or args.listen_tls:
        plain = [
            a for a in config.listen if not a.tls
        ] if not args.listen else [parse_listen(v, key="--listen") for v in args.listen]
        tls = [a for a in config.listen if a.tls] if not args.listen_tls else [
            parse_listen(v, tls=True, key="--listen-tls") for v in args.listen_tls
        ]
        changes["listen"] = tuple(plain + tls)
    if args.log_format:
        changes["log_format"] = args.log_format
    if args.log_level:
        changes["log_level"] = args.log_level
    if getattr(args, "allow_root", False):
        changes["process"] = dataclasses.replace(config.process, allow_root=True)
    return dataclasses.replace(config, **changes) if changes else config


async def serve(
    config: Config,
    *,
    ready: asyncio.Event | None = None,
    reload_config: Callable[[], Config] | None = None,
    worker: WorkerSpec | None = None,
) -> None:
    """Run until a stop signal arrives; ``reload_config`` re-reads the config on SIGHUP.

    ``worker``: run as one worker of a supervisor (``cli.supervise``), on the
    sockets it bound, with the connection counts and login state it shares.
    """
    os.umask(config.process.umask)
    link = None
    if worker is not None:
        config = worker_config(config, worker)
        link = await WorkerLink.open(worker)
    if link is not None:
        runtime = build_runtime(config, defence=link.defence_state(config),
                                auth_cache=link.auth_cache)
    else:
        runtime = build_runtime(config)
    await prepare_backends(runtime)
    if any(a.tls for a in config.listen) and runtime.tls is None:
        raise ConfigError("server.listen_tls: needs tls.cert and tls.key")
    if link is not None:  # metrics on iff the supervisor gave us a directory to count in
        metrics = Metrics(worker=link.spec.number) if os.environ.get(MULTIPROC_ENV) else None
    else:
        metrics = Metrics() if config.metrics.listen else None
    server = build_server(runtime, metrics, gate=link.gate if link else None,
                          sockets=link.pop3_sockets() if link else None)
    lmtp = build_lmtp_server(runtime, metrics, sockets=link.lmtp_sockets() if link else None)
    service = Service(runtime, server, load_config=reload_config, metrics=metrics, lmtp=lmtp)
    ops = None
    if config.metrics.listen and link is None:
        address = parse_listen(config.metrics.listen, key="metrics.listen")
        ops = OpsEndpoint(address, metrics, service.health)
    if link is not None:  # the supervisor bound the sockets and dropped privileges
        await server.start()
        if lmtp is not None:
            await lmtp.start()
    else:
        await bind_and_drop(runtime, [server] if lmtp is None else [server, lmtp], ops,
                            accept=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, service.reload)
    if link is not None:
        # An orphaned worker (its supervisor killed) drains and exits like on SIGTERM.
        lost = loop.create_task(link.state.lost.wait())
        lost.add_done_callback(lambda _: stop.set())
        await link.ready()
    if ready is not None:
        ready.set()
    await stop.wait()
    service.stopping = True
    log_event("stopping", sessions=server.active_sessions)
    config = service.config
    if ops is not None:
        await ops.close()
    if lmtp is None:
        await server.shutdown(config.limits.shutdown_grace)
    else:
        # LMTP sessions finish their transaction first (see server.listeners).
        await asyncio.gather(
            server.shutdown(config.limits.shutdown_grace),
            lmtp.shutdown(config.limits.shutdown_grace),
        )
    await service.runtime.defence.close()  # known-good networks written before exit
    await close_backends(service.runtime)
    if link is not None:
        await link.close()


async def prepare_backends(runtime: Runtime) -> None:
    """Refuse to start on a database schema that is behind or ahead (never upgrade it here)."""
    for backend in (runtime.store, runtime.users):
        await check_backend_schema(backend)


async def close_backends(runtime: Runtime) -> None:
    """Close database pools and stop lease heartbeats (leases still held then expire)."""
    for backend in (runtime.store, runtime.users):
        await close_backend(backend)


def run_event_loop(
    config: Config,
    reload_config: Callable[[], Config] | None = None,
    *,
    worker: WorkerSpec | None = None,
    command: list[str] | None = None,
) -> int:
    """Run ``serve`` (or, with ``command``, the supervisor) on uvloop when installed."""
    setup_logging(config.log_level, config.log_format)
    if command is not None:
        main = supervise(config, command=command, reload_config=reload_config)
    else:
        main = serve(config, reload_config=reload_config, worker=worker)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
    return 0


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag serve``: one process, a supervisor, or one of its workers."""
    config = apply_overrides(config_from_args(args), args)

    def reload_config() -> Config:
        return apply_overrides(config_from_args(args), args)

    worker = WorkerSpec.from_env(os.environ)
    if worker is not None:
        return run_event_loop(config, reload_config, worker=worker)
    if worker_count(config) > 1:
        return run_event_loop(config, reload_config, command=worker_command(args, config))
    return run_event_loop(config, reload_config)

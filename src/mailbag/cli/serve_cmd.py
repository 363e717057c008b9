"""``mailbag serve``: run the POP3 server in the foreground until SIGTERM/SIGINT.

SIGTERM or SIGINT stops accepting, gives open sessions ``limits.shutdown_grace``
seconds, then cancels what is left; a cancelled session never applies its
deletions.  SIGHUP reloads the TLS certificate (the users file reloads by
itself when it changes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
from typing import Any

from mailbag.cli.common import add_config_option, config_from_args
from mailbag.cli.wiring import build_lmtp_server, build_runtime, build_server
from mailbag.config import Config, parse_listen
from mailbag.errors import ConfigError
from mailbag.logs import log_event, setup_logging


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` command."""
    parser = subparsers.add_parser(
        "serve",
        help="run the POP3 server in the foreground",
        description="Run the POP3 server in the foreground, logging to stderr. "
        "SIGTERM/SIGINT stop it gracefully; SIGHUP reloads the TLS certificate.",
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
    return dataclasses.replace(config, **changes) if changes else config


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """Run until a stop signal arrives."""
    runtime = build_runtime(config)
    if any(a.tls for a in config.listen) and runtime.tls is None:
        raise ConfigError("server.listen_tls: needs tls.cert and tls.key")
    server = build_server(runtime)
    await server.start()
    lmtp = build_lmtp_server(runtime)
    if lmtp is not None:
        try:
            await lmtp.start()
        except BaseException:
            await server.close_listeners()
            raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload_tls() -> None:
        if runtime.tls is None:
            return
        try:
            runtime.tls.reload()
        except ConfigError as exc:
            log_event("reload-failed", logging.ERROR, error=str(exc))
        else:
            log_event("reloaded", what="tls certificate")

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, reload_tls)
    if ready is not None:
        ready.set()
    await stop.wait()
    log_event("stopping", sessions=server.active_sessions)
    if lmtp is None:
        await server.shutdown(config.limits.shutdown_grace)
    else:
        # LMTP sessions finish their transaction first (see server.lmtp_listener).
        await asyncio.gather(
            server.shutdown(config.limits.shutdown_grace),
            lmtp.shutdown(config.limits.shutdown_grace),
        )


def run_event_loop(config: Config) -> int:
    """Run ``serve`` on uvloop when installed, else the default loop."""
    setup_logging(config.log_level, config.log_format)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag serve``."""
    config = apply_overrides(config_from_args(args), args)
    return run_event_loop(config)

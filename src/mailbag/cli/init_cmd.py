"""``mailbag init [DIR]``: a ready-to-edit server home.

Writes a commented ``mailbag.toml``, an empty users file (0600), the mail
root (0700) and a self-signed certificate, and refuses to overwrite an
existing config so a second ``init`` can never destroy a working setup.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from mailbag.cli.common import UsageError
from mailbag.cli.config_template import render
from mailbag.server.tls import write_self_signed


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``init`` command."""
    parser = subparsers.add_parser(
        "init",
        help="create a config file, users file, mail root and TLS certificate",
        description="Create a mailbag home in DIR (default: the current directory): "
        "a commented mailbag.toml, an empty users file, the mail root and a "
        "self-signed TLS certificate.",
    )
    parser.add_argument("dir", nargs="?", default=".", type=Path, help="directory to set up")
    parser.add_argument("--hostname", default="", help="host name for greeting and certificate")
    parser.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="plain POP3 listener (default 0.0.0.0:110)",
    )
    parser.add_argument(
        "--listen-tls",
        action="append",
        metavar="HOST:PORT",
        help="POP3S listener (default 0.0.0.0:995)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing mailbag.toml")
    parser.set_defaults(handler=run)


def init_home(
    home: Path,
    *,
    hostname: str = "",
    listen: tuple[str, ...] = ("0.0.0.0:110",),
    listen_tls: tuple[str, ...] = ("0.0.0.0:995",),
    force: bool = False,
) -> Path:
    """Create the files; return the config path."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "mailbag.toml"
    if config.exists() and not force:
        raise UsageError(f"{config} already exists (use --force to overwrite)")
    config.write_text(
        render(hostname=hostname, listen=listen, listen_tls=listen_tls), encoding="utf-8"
    )
    users = home / "users"
    if not users.exists():
        fd = os.open(users, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    (home / "mail").mkdir(mode=0o700, exist_ok=True)
    tls_dir = home / "tls"
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
    if force or not cert.exists() or not key.exists():
        write_self_signed(cert, key, hostname or socket.gethostname() or "localhost")
    return config


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag init``."""
    config = init_home(
        args.dir,
        hostname=args.hostname,
        listen=tuple(args.listen or ("0.0.0.0:110",)),
        listen_tls=tuple(args.listen_tls or ("0.0.0.0:995",)),
        force=args.force,
    )
    print(f"Wrote {config}")
    print(f"Next: mailbag user add NAME -c {config}")
    print(f"      mailbag serve -c {config}")
    return 0

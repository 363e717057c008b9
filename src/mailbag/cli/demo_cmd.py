"""``mailbag demo``: a throwaway server to try by hand with telnet, as in the seed document.

Creates a home (a temporary directory unless ``--home`` is given), a user
``demo`` with password ``demo``, four sample messages (English, GBK Chinese,
multipart with attachment, dot-leading lines), and serves POP3 on
127.0.0.1:1110.  Plaintext login is allowed because it only listens on
loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

from mailbag.cli.init_cmd import init_home
from mailbag.cli.serve_cmd import run_event_loop
from mailbag.cli.wiring import build_store, build_users
from mailbag.config import load_config
from mailbag.demo_messages import sample_messages


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command."""
    parser = subparsers.add_parser(
        "demo",
        help="serve a throwaway demo maildrop (user demo, password demo) on 127.0.0.1:1110",
        description="Create a demo home with user demo/demo and sample messages, then serve "
        "POP3 on loopback. Try: telnet 127.0.0.1 1110",
    )
    parser.add_argument("--home", type=Path, help="keep the demo home here (default: temporary)")
    parser.add_argument("--port", type=int, default=1110, help="port on 127.0.0.1 (default 1110)")
    parser.set_defaults(handler=run)


def prepare_demo(home: Path, port: int) -> Path:
    """Create (or reuse) a demo home; return its config path."""
    config_path = home / "mailbag.toml"
    if not config_path.exists():
        init_home(
            home,
            hostname="localhost",
            listen=(f"127.0.0.1:{port}",),
            listen_tls=(f"127.0.0.1:{port + 1}",),
        )
    config = load_config(config_path)
    users = build_users(config)
    if users.lookup("demo") is None:
        users.add("demo", "demo", apop_secret="demo")
        store = build_store(config)
        for message in sample_messages():
            asyncio.run(store.deliver("demo", message))
    return config_path


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag demo``."""
    temporary = args.home is None
    home = Path(tempfile.mkdtemp(prefix="mailbag-demo-")) if temporary else args.home
    try:
        config_path = prepare_demo(home, args.port)
        config = load_config(config_path)
        # A loopback toy that lives for one terminal session: root is allowed here.
        config = dataclasses.replace(
            config, process=dataclasses.replace(config.process, allow_root=True)
        )
        print(
            f"mailbag demo: home {home}\n"
            f"  POP3  127.0.0.1:{args.port}   POP3S 127.0.0.1:{args.port + 1} (self-signed)\n"
            f"  try:  telnet 127.0.0.1 {args.port}\n"
            "        user demo / pass demo / stat / list / top 1 / retr 1 / dele 1 / quit\n"
            "  stop with Ctrl-C",
            file=sys.stderr,
            flush=True,
        )
        return run_event_loop(config)
    finally:
        if temporary:
            shutil.rmtree(home, ignore_errors=True)

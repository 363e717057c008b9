"""``mailbag`` entry point: one sub-command group per module.

Each command module exposes ``register(subparsers)`` which adds its parser and
sets ``handler`` (a callable taking the parsed namespace and returning an exit
code).  ``main`` turns every expected failure into one clear line on stderr and
a non-zero exit status: a user must never see a traceback for a bad config, a
port in use or a missing file.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mailbag import __version__
from mailbag.errors import MailbagError

#: Command modules in the order ``--help`` lists them.
COMMAND_MODULES = (
    "mailbag.cli.init_cmd",
    "mailbag.cli.serve_cmd",
    "mailbag.cli.demo_cmd",
    "mailbag.cli.user_cmd",
    "mailbag.cli.deliver_cmd",
    "mailbag.cli.mail_cmd",
    "mailbag.cli.check_cmd",
    "mailbag.cli.status_cmd",
    "mailbag.cli.migrate_cmd",
    "mailbag.cli.db_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full parser (also used by tests and for ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="mailbag",
        description="mailbag: a POP3 mail system on Maildir "
        "(server, local delivery, user administration, terminal client).",
    )
    parser.add_argument("--version", action="version", version=f"mailbag {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        result: int = handler(args)
    except KeyboardInterrupt:
        print("mailbag: interrupted", file=sys.stderr)
        return 130
    except MailbagError as exc:
        print(f"mailbag: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    return result


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())

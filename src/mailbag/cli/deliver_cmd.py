"""``mailbag deliver USER... < message``: a local delivery agent for an MTA.

Exit codes follow sysexits.h so the MTA does the right thing: 67 (unknown
user: bounce), 75 (temporary failure: retry later), 65 (data error: bounce),
78 (configuration error: retry, and the admin sees it in the log).  All
recipients are checked before anything is written, so an unknown recipient
never causes duplicates on retry; with several recipients, a temporary
failure part-way makes the MTA retry all of them, so configure one recipient
per invocation (Postfix's ``mailbox_command`` already does).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from mailbag.cli.common import add_config_option, config_from_args
from mailbag.cli.wiring import build_store, build_users, check_mail_root
from mailbag.errors import (
    ConfigError,
    InvalidUsername,
    MessageTooLarge,
    PermanentStorageError,
    StorageError,
)

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_TEMPFAIL = 75
EX_CONFIG = 78


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``deliver`` command."""
    parser = subparsers.add_parser(
        "deliver",
        help="deliver a message from stdin into users' maildrops (for an MTA)",
        description="Read one message from stdin and store it in each USER's Maildir. "
        "Exit status: 0 delivered, 67 unknown user, 75 temporary failure, "
        "65 data error, 78 configuration error.",
    )
    parser.add_argument("users", nargs="+", metavar="USER", help="recipient account(s)")
    parser.add_argument("-f", "--from", dest="sender", help="envelope sender (adds Return-Path)")
    add_config_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag deliver``; never raises, always returns a sysexits code."""
    try:
        config = config_from_args(args)
        check_mail_root(config)
        users = build_users(config)
        store = build_store(config)
    except ConfigError as exc:
        print(f"mailbag deliver: {exc}", file=sys.stderr)
        return EX_CONFIG
    recipients = []
    for name in args.users:
        try:
            record = users.lookup(name)
        except InvalidUsername:
            record = None
        if record is None:
            print(f"mailbag deliver: {name}: unknown user", file=sys.stderr)
            return EX_NOUSER
        recipients.append(record.name)
    limit = config.storage.max_message_size
    message = sys.stdin.buffer.read(limit + 1 if limit else -1)
    if not message:
        print("mailbag deliver: empty message on stdin", file=sys.stderr)
        return EX_DATAERR
    if limit and len(message) > limit:
        print(f"mailbag deliver: message larger than {limit} octets", file=sys.stderr)
        return EX_DATAERR
    if args.sender is not None:
        if any(c in args.sender for c in "\r\n<>") or len(args.sender) > 998:
            print("mailbag deliver: invalid envelope sender", file=sys.stderr)
            return EX_DATAERR
        message = f"Return-Path: <{args.sender}>\n".encode() + message
    for name in recipients:
        try:
            asyncio.run(store.deliver(name, message))
        except MessageTooLarge as exc:
            print(f"mailbag deliver: {name}: {exc}", file=sys.stderr)
            return EX_DATAERR
        except PermanentStorageError as exc:
            print(f"mailbag deliver: {name}: {exc}", file=sys.stderr)
            return EX_DATAERR
        except StorageError as exc:
            print(f"mailbag deliver: {name}: {exc}", file=sys.stderr)
            return EX_TEMPFAIL
    return EX_OK

"""``mailbag deliver USER... < message``: a local delivery agent for an MTA.

Exit codes follow sysexits.h so the MTA does the right thing: 67 (unknown
user: bounce), 75 (temporary failure, or over quota with
``quota.tempfail``: retry later), 65 (data error, e.g. too large: bounce),
73 (over quota: bounce), 78 (configuration error: retry, and the admin sees
it in the log).  The first line on stderr starts with the RFC 3463 code
(``5.2.2 <bob> Mailbox full``), which Postfix puts into the bounce.

Delivery goes through ``session.delivery.DeliveryAgent``, the same code
path as LMTP: same size and quota checks, same atomic Maildir write.  The
trace headers are added only for what the MTA tells us (``-f`` gives
``Return-Path:``, ``-a`` gives ``Delivered-To:`` and ``Received:``),
because Postfix ``local`` already prepends its own for command delivery
and duplicates would only confuse; without flags the message is stored
exactly as read (useful for imports too).  A leading mbox ``From `` line
(procmail-style input) is dropped.  All recipients are checked before
anything is written, so an unknown recipient never causes duplicates on
retry; with several recipients, a temporary failure part-way makes the MTA
retry all of them, so configure one recipient per invocation (Postfix's
``mailbox_command`` already does).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from mailbag.cli.common import add_config_option, config_from_args
from mailbag.cli.wiring import (
    build_delivery_agent,
    build_store,
    build_users,
    prepare_store,
)
from mailbag.errors import AuthError, ConfigError
from mailbag.logs import LOGGER_NAME
from mailbag.session.delivery import DeliveryAgent, Envelope, Outcome

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``deliver`` command."""
    parser = subparsers.add_parser(
        "deliver",
        help="deliver a message from stdin into users' maildrops (for an MTA)",
        description="Read one message from stdin and store it in each USER's Maildir. "
        "Exit status: 0 delivered, 67 unknown user, 75 temporary failure, "
        "65 data error (e.g. too large), 73 over quota, 78 configuration error.",
    )
    parser.add_argument("users", nargs="+", metavar="USER", help="recipient account(s)")
    parser.add_argument("-f", "--from", dest="sender", help="envelope sender (adds Return-Path)")
    parser.add_argument(
        "-a",
        "--address",
        dest="address",
        help="envelope recipient address (adds Delivered-To and Received)",
    )
    add_config_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag deliver``; never raises, always returns a sysexits code."""
    # stderr is the MTA's bounce text: the status line must come first, so the
    # structured log (meant for the server's log) is not printed here.
    logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())
    try:
        config = config_from_args(args)
        store = build_store(config)
        prepare_store(store)
        agent = build_delivery_agent(config, build_users(config), store)
    except ConfigError as exc:
        print(f"mailbag deliver: {exc}", file=sys.stderr)
        return EX_CONFIG
    for value, what in ((args.sender, "sender"), (args.address, "recipient")):
        if value is not None and (any(c in value for c in "\r\n<>") or len(value) > 998):
            print(f"5.1.7 mailbag deliver: invalid envelope {what}", file=sys.stderr)
            return EX_DATAERR
    return asyncio.run(deliver(agent, args.users, args.sender, args.address))


def read_message(limit: int) -> bytes:
    """Read stdin (one octet past ``limit`` to detect "too large") minus an mbox From_ line."""
    message = sys.stdin.buffer.read(limit + 1 if limit else -1)
    if message.startswith(b"From "):
        _, _, message = message.partition(b"\n")
    return message


async def deliver(
    agent: DeliveryAgent, names: list[str], sender: str | None, address: str | None
) -> int:
    """Check every recipient, read the message, deliver to each; return the exit code."""
    records = []
    for name in names:
        try:
            record = agent.lookup(name)
        except AuthError as exc:
            print(f"4.3.0 mailbag deliver: users file unreadable: {exc}", file=sys.stderr)
            return EX_TEMPFAIL
        if record is None:
            print(f"5.1.1 mailbag deliver: {name}: unknown user", file=sys.stderr)
            return EX_NOUSER
        records.append(record)
    message = read_message(agent.max_message_size)
    if not message:
        print("5.6.0 mailbag deliver: empty message on stdin", file=sys.stderr)
        return EX_DATAERR
    envelope = Envelope(sender=sender, recipient=address, received=address is not None)
    for record in records:
        result = await agent.deliver(record, message, envelope)
        if result.outcome is Outcome.DELIVERED:
            continue
        status = result.status
        print(f"{status.enhanced} {status.text} (mailbag deliver)", file=sys.stderr)
        if status.code < 500:
            return EX_TEMPFAIL
        return EXIT_CODES.get(result.outcome, EX_DATAERR)
    return EX_OK


#: Permanent outcomes -> sysexits (temporary ones are always EX_TEMPFAIL).
EXIT_CODES = {
    Outcome.UNKNOWN_USER: EX_NOUSER,
    Outcome.TOO_LARGE: EX_DATAERR,
    Outcome.OVER_QUOTA: EX_CANTCREAT,
    Outcome.PERMANENT: EX_DATAERR,
}

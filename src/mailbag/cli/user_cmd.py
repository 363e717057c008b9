"""``mailbag user add|passwd|del|list``: manage the users file.

Passwords are read from a non-echoing prompt or, for scripts, one line on
stdin (``--password-stdin``); never from the command line, where other users
could read them in the process list.
"""

from __future__ import annotations

import argparse
import asyncio

from mailbag.cli.common import add_config_option, config_from_args, read_new_password
from mailbag.cli.wiring import build_store, build_users
from mailbag.errors import StorageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``user`` command group."""
    parser = subparsers.add_parser(
        "user", help="add, change, remove and list users", description="Manage POP3 accounts."
    )
    sub = parser.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    add = sub.add_parser("add", help="create an account", description="Create an account.")
    add.add_argument("name", help="account name, e.g. alice or alice@example.org")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument(
        "--apop",
        action="store_true",
        help="also store a retrievable secret so APOP works (weaker: see README)",
    )
    add_config_option(add)
    add.set_defaults(handler=run_add)

    passwd = sub.add_parser("passwd", help="change a password", description="Change a password.")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    passwd.add_argument("--apop", action="store_true", help="keep an APOP secret too")
    add_config_option(passwd)
    passwd.set_defaults(handler=run_passwd)

    delete = sub.add_parser(
        "del",
        help="remove an account (its mail stays on disk)",
        description="Remove an account from the users file. Its Maildir is left on disk.",
    )
    delete.add_argument("name")
    add_config_option(delete)
    delete.set_defaults(handler=run_del)

    quota = sub.add_parser(
        "quota",
        help="set an account's quota",
        description="Set the account's limits; an omitted limit falls back to [quota] "
        "in the config, and 0 means unlimited.",
    )
    quota.add_argument("name")
    quota.add_argument("--bytes", type=int, help="octets, as POP3 counts them")
    quota.add_argument("--messages", type=int, help="number of messages")
    add_config_option(quota)
    quota.set_defaults(handler=run_quota)

    listing = sub.add_parser("list", help="list accounts and mailbox usage")
    add_config_option(listing)
    listing.set_defaults(handler=run_list)


def run_add(args: argparse.Namespace) -> int:
    """Handle ``user add``."""
    users = build_users(config_from_args(args))
    password = read_new_password(from_stdin=args.password_stdin)
    users.add(args.name, password, apop_secret=password if args.apop else None)
    print(f"Added user {args.name}")
    return 0


def run_passwd(args: argparse.Namespace) -> int:
    """Handle ``user passwd``."""
    users = build_users(config_from_args(args))
    password = read_new_password(from_stdin=args.password_stdin)
    users.set_password(args.name, password)
    if args.apop:
        users.set_apop_secret(args.name, password)
    print(f"Changed password of {args.name}")
    return 0


def run_del(args: argparse.Namespace) -> int:
    """Handle ``user del``."""
    users = build_users(config_from_args(args))
    users.delete(args.name)
    print(f"Removed user {args.name} (mail left on disk)")
    return 0


def run_quota(args: argparse.Namespace) -> int:
    """Handle ``user quota``: delivery refuses what would exceed it (552 5.2.2)."""
    users = build_users(config_from_args(args))
    users.set_quota(args.name, bytes=args.bytes, messages=args.messages)
    print(f"Set quota of {args.name}: bytes={args.bytes or '-'} messages={args.messages or '-'}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Handle ``user list``: name, messages, octets, and quota limits where set.

    The limits shown are the effective ones (the user's own, else ``[quota]``),
    so an administrator sees what delivery will enforce.
    """
    config = config_from_args(args)
    users = build_users(config)
    store = build_store(config)
    records = users.list()
    width = max((len(r.name) for r in records), default=4)
    print(f"{'USER':<{width}}  {'MESSAGES':>8}  {'OCTETS':>12}  "
          f"{'QUOTA MSGS':>10}  {'QUOTA OCTETS':>12}")
    for record in records:
        try:
            usage = asyncio.run(store.usage(record.name))
            count, octets = str(usage.messages), str(usage.octets)
        except StorageError:
            count, octets = "?", "?"
        qb = record.quota_bytes if record.quota_bytes is not None else config.quota.bytes
        qm = record.quota_messages if record.quota_messages is not None else config.quota.messages
        print(f"{record.name:<{width}}  {count:>8}  {octets:>12}  "
              f"{qm or '-':>10}  {qb or '-':>12}")
    return 0

"""``mailbag migrate``: move mail in, or between storage backends, keeping every POP3 UIDL.

``migrate dovecot`` brings accounts and mail from Dovecot; ``migrate maildir
postgres`` (and ``postgres maildir``) moves every user's maildrop from one
backend to the other through the ``Store`` interface (``StoreSource`` ->
``Store.import_messages``), both built from the same config.

One line per user as it is done (progress), then a summary; ``--dry-run``
shows the same without writing.  Re-running is safe and is the way to pick
up stragglers after a final sync.  Exit status 0 when every user migrated
and verified, 1 when any failed (the others are still done).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from mailbag.cli.common import UsageError, add_config_option, config_from_args
from mailbag.cli.progress import ProgressBar
from mailbag.cli.wiring import build_store, build_users, check_backend_schema, close_backend
from mailbag.errors import ConfigError, MailbagError
from mailbag.migrate.dovecot import DEFAULT_UIDL_FORMAT, UidlFormat, read_passwd_file
from mailbag.migrate.pipeline import StoreSource, import_user
from mailbag.migrate.run import MigrationUsersFile, Options, UserReport, migrate_user
from mailbag.server.privileges import resolve
from mailbag.storage import registry
from mailbag.storage.base import FileOwner, ImportMessage, ImportOptions, Store


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate dovecot``."""
    parser = subparsers.add_parser(
        "migrate",
        help="move users and mail from another server",
        description="Move users and mail from another server to mailbag.",
    )
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    dovecot = sub.add_parser(
        "dovecot",
        help="from Dovecot: passwd-file and Maildirs, keeping POP3 UIDLs",
        description="Copy Dovecot passwd-file accounts into mailbag's users file and each "
        "user's INBOX Maildir into mailbag's storage, recording the UIDL Dovecot reported "
        "for every message (from dovecot-uidlist and pop3_uidl_format, or the values saved "
        "with pop3_save_uidl), so no POP3 client downloads a message twice. Stop Dovecot "
        "(or at least its POP3/IMAP service) first. Safe to run again.",
    )
    add_config_option(dovecot)
    dovecot.add_argument("--passwd-file", type=Path, required=True, metavar="FILE",
                         help="Dovecot passwd-file (user:{SCHEME}hash:uid:gid:gecos:home:...)")
    dovecot.add_argument(
        "--maildir-template", required=True, metavar="TEMPLATE",
        help="where Dovecot keeps each user's Maildir: Dovecot's mail_location "
        "(maildir:~/Maildir, /var/vmail/%%d/%%n) or {user}/{local}/{domain}/{home}",
    )
    dovecot.add_argument(
        "--uidl-format", default=DEFAULT_UIDL_FORMAT, metavar="FORMAT",
        help="Dovecot's pop3_uidl_format (`doveconf pop3_uidl_format`; "
        f"default {DEFAULT_UIDL_FORMAT.replace('%', '%%')})",
    )
    mode = dovecot.add_mutually_exclusive_group()
    mode.add_argument("--link", action="store_const", dest="mode", const="link",
                      help="hard-link message files instead of copying (Maildir storage on "
                      "the same filesystem; the files are then shared with Dovecot's tree)")
    mode.add_argument("--copy", action="store_const", dest="mode", const="copy",
                      help="copy message files (the default)")
    dovecot.add_argument("--user", action="append", dest="only", metavar="NAME",
                         help="migrate only this user (repeatable)")
    dovecot.add_argument("--dry-run", action="store_true",
                         help="read and report everything, write nothing")
    dovecot.add_argument("--replace-uidls", action="store_true",
                         help="overwrite UIDLs a previous run recorded differently (only if "
                         "that run used the wrong --uidl-format and mailbag has not served "
                         "them yet)")
    dovecot.add_argument("--no-accounts", action="store_true",
                         help="move mail only; leave mailbag's users file alone")
    dovecot.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    dovecot.set_defaults(handler=run_dovecot, mode="copy")
    _register_backends(sub)


def _register_backends(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``migrate SOURCE TARGET`` for every pair of persistent storage backends."""
    # "memory" lives and dies with one process: there is nothing to move from or to.
    names = [name for name in registry.available() if name != "memory"]
    for name in names:
        parser = sub.add_parser(
            name,
            help=f"from {name} storage to another backend, keeping UIDLs",
            description=f"Copy every user's maildrop from the {name} storage backend to "
            "TARGET, both as configured in the config file ([storage], [database]), "
            "keeping every UIDL exactly and the order of the messages. Users are those of "
            "the users backend (auth.backend). Stop the server first (a maildrop in use is "
            "reported and skipped). Safe to run again: what is there already is not copied "
            "twice, and a message deleted from TARGET since is not brought back. Then set "
            "storage.backend to TARGET.",
        )
        parser.add_argument("target", choices=[n for n in names if n != name],
                            help="storage backend to copy to")
        add_config_option(parser)
        parser.add_argument("--user", action="append", dest="only", metavar="NAME",
                            help="migrate only this user (repeatable)")
        parser.add_argument("--dry-run", action="store_true",
                            help="read and report everything, write nothing")
        parser.add_argument("-q", "--quiet", action="store_true",
                            help="no progress bar and no line per user; only the summary")
        parser.set_defaults(handler=run_between_backends, source_backend=name)


def _owner(config_user: str, config_group: str) -> tuple[int, int] | None:
    """Whom new files belong to: the server's account when we run as root."""
    if os.geteuid() != 0:
        return None
    from mailbag.config import ProcessSettings

    account = resolve(ProcessSettings(user=config_user, group=config_group))
    if account is None:
        return None
    return account.uid, account.gid


def describe(report: UserReport, *, dry_run: bool) -> str:
    """One line for one user."""
    if report.error:
        return f"{report.name}: FAILED: {report.error}"
    would = "would be " if dry_run else ""
    parts = [f"account {would}{report.account}" if report.account else "account untouched"]
    if report.messages or report.source is not None:
        parts.append(
            f"{report.messages} messages, {report.transferred} {would}copied, "
            f"{report.present} already there"
        )
        uidls = f"{report.uidls} Dovecot UIDLs kept"
        if report.saved_uidls:
            uidls += f" ({report.saved_uidls} saved by pop3_save_uidl)"
        if report.unlisted:
            uidls += f", {report.unlisted} never listed by Dovecot"
        parts.append(uidls)
    if report.verified:
        parts.append("verified")
    line = f"{report.name}: " + "; ".join(parts)
    for warning in report.warnings:
        line += f"\n  warning: {warning}"
    return line


def run_dovecot(args: argparse.Namespace) -> int:
    """Handle ``mailbag migrate dovecot``."""
    config = config_from_args(args)
    try:
        fmt = UidlFormat(args.uidl_format)
    except ConfigError as exc:
        raise UsageError(f"--uidl-format: {exc}") from None
    entries = read_passwd_file(args.passwd_file)
    if args.only:
        wanted = set(args.only)
        unknown = wanted - {e.name for e in entries}
        if unknown:
            raise UsageError(f"--user: not in {args.passwd_file}: {', '.join(sorted(unknown))}")
        entries = [e for e in entries if e.name in wanted]
    owner = _owner(config.process.user, config.process.group)
    opts = Options(args.maildir_template, fmt, mode=args.mode, dry_run=args.dry_run,
                   replace_uidls=args.replace_uidls)
    store = build_store(config)
    if owner and isinstance(store, FileOwner):
        store.set_owner(*owner)
    users = None
    if not args.no_accounts:
        users_path = config.auth.users_file
        created = not users_path.exists()
        users = MigrationUsersFile(users_path, default_domain=config.auth.default_domain or None)
    if args.dry_run:
        print("dry run: nothing is written", flush=True)
    failed = 0
    totals = {"messages": 0, "uidls": 0, "transferred": 0}

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    for entry in entries:
        report = migrate_user(entry, store=store, users=users, opts=opts, progress=progress)
        failed += bool(report.error)
        totals["messages"] += report.messages
        totals["uidls"] += report.uidls
        totals["transferred"] += report.transferred
        if not args.quiet or report.error:
            print(describe(report, dry_run=args.dry_run), flush=True)
    if users is not None and created and owner and users.path.exists() and not args.dry_run:
        os.chown(users.path, *owner)
    who = pwd.getpwuid(owner[0]).pw_name if owner else None
    print(
        f"{'dry run: ' if args.dry_run else ''}{len(entries)} users, {totals['messages']} "
        f"messages ({totals['transferred']} {'to copy' if args.dry_run else 'copied'}), "
        f"{totals['uidls']} UIDLs kept from Dovecot, {failed} failed"
        + (f"; files owned by {who}" if who else ""),
        flush=True,
    )
    return 1 if failed else 0


def run_between_backends(args: argparse.Namespace) -> int:
    """Handle ``mailbag migrate SOURCE TARGET`` (e.g. ``maildir postgres``)."""
    config = config_from_args(args)
    source = build_store(config, args.source_backend)
    target = build_store(config, args.target)
    owner = _owner(config.process.user, config.process.group)
    if owner and isinstance(target, FileOwner):
        target.set_owner(*owner)
    names = [record.name for record in build_users(config).list()]
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            raise UsageError(f"--user: no such user: {', '.join(sorted(unknown))}")
        names = [name for name in names if name in set(args.only)]
    with open(os.devnull, "w") if args.quiet else contextlib.nullcontext(sys.stderr) as out:
        bar = ProgressBar(out)
        return asyncio.run(_between_backends(args, source, target, names, bar))


async def _between_backends(
    args: argparse.Namespace, source: Store, target: Store, names: list[str], bar: ProgressBar
) -> int:
    options = ImportOptions(dry_run=args.dry_run)
    would = "would be " if args.dry_run else ""
    failed = messages = copied = 0
    try:
        for store in (source, target):
            await check_backend_schema(store)
        if args.dry_run:
            print("dry run: nothing is written", flush=True)
        for name in names:
            try:
                result, verified = await import_user(
                    target, name, _tracked(StoreSource(source), name, bar), options)
            except MailbagError as exc:
                bar.finish()
                failed += 1
                print(f"{name}: FAILED: {exc}", flush=True)
                continue
            bar.finish()
            messages += result.imported + result.present
            copied += result.imported
            if not args.quiet:
                line = (f"{name}: {result.imported + result.present} messages, "
                        f"{result.imported} {would}copied, {result.present} already there")
                if result.conflicts:
                    line += f", {result.conflicts} kept under their earlier UIDL"
                line += "; verified" if verified else ""
                for warning in result.warnings:
                    line += f"\n  warning: {warning}"
                print(line, flush=True)
    finally:
        for store in (source, target):
            await close_backend(store)
    print(f"{'dry run: ' if args.dry_run else ''}{len(names)} users, {messages} messages "
          f"({copied} {'to copy' if args.dry_run else 'copied'}) from {args.source_backend} "
          f"to {args.target}, {failed} failed", flush=True)
    return 1 if failed else 0


async def _tracked(
    source: StoreSource, user: str, bar: ProgressBar
) -> AsyncIterator[ImportMessage]:
    """``user``'s messages from ``source``, advancing ``bar``; the source closed at the end."""
    async with contextlib.aclosing(source.messages(user, lambda n: bar.start(user, n))) as it:
        async for message in it:
            yield message
            bar.advance()

"""Carrying out a Dovecot -> mailbag migration, one user at a time.

For each passwd-file user: add the account to mailbag's users file (the
line is copied verbatim: the format is the same), then read the Dovecot
INBOX Maildir as a source of messages (Dovecot's POP3 order, the UIDL
Dovecot reported for each, flags, arrival time) and feed it through the
generic pipeline (``migrate.pipeline``) into whatever ``Store`` the config
names.  The store keeps the UIDLs, writes atomically under its own lock, and
the pipeline then opens the maildrop the way the POP3 server will and
compares the UIDL list with Dovecot's: the migration proves its result
instead of hoping.

Safe to re-run: messages already there are skipped, existing accounts are
kept, and a UIDL mailbag already serves is never changed (unless asked),
because changing it would make clients download again.  ``dry_run`` reads
and reports everything and writes nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailbag.auth.schemes import READABLE_SCHEMES, split_scheme
from mailbag.auth.users import UsersFile, validate_username
from mailbag.errors import AuthError, InvalidUsername, MailbagError
from mailbag.migrate.dovecot import (
    PasswdEntry,
    UidlFormat,
    Uidlist,
    base_name,
    dovecot_uidl,
    maildir_location,
    read_uidlist,
)
from mailbag.migrate.pipeline import import_user
from mailbag.storage.base import ImportMessage, ImportOptions, Store
from mailbag.storage.maildir_names import arrival_key  # pure name rules: the source is a Maildir

SUBDIRS = ("new", "cur")


@dataclass(frozen=True, slots=True)
class Options:
    """How to migrate (from the command line)."""

    maildir_template: str
    uidl_format: UidlFormat
    mode: str = "copy"  # "copy" or "link" (hard links where the store can)
    dry_run: bool = False
    replace_uidls: bool = False


@dataclass(slots=True)
class UserReport:
    """What happened to one user; printed as one line by the command."""

    name: str
    source: Path | None = None
    account: str = ""  # "added", "exists", "skipped"
    messages: int = 0
    uidls: int = 0
    saved_uidls: int = 0
    unlisted: int = 0  # files Dovecot had not numbered yet (no client saw them)
    transferred: int = 0
    present: int = 0
    conflicts: int = 0
    verified: bool = False
    warnings: list[str] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True, slots=True)
class _Message:
    subdir: str
    filename: str
    key: str
    uidl: str | None  # None: Dovecot never listed it; the store chooses its own
    mtime: float


class MigrationUsersFile(UsersFile):
    """The users file, plus appending a line copied verbatim from a Dovecot passwd-file."""

    def add_line(self, name: str, line: str) -> bool:
        """Append ``line`` for ``name`` unless the account exists; True if added."""
        added = False

        def edit(lines: list[str]) -> None:
            nonlocal added
            if self._find(lines, name) < 0:
                lines.append(line)
                added = True

        self._rewrite(edit)
        return added


def _on_disk(source: Path) -> dict[str, tuple[str, str, float]]:
    """Message files in ``new/`` and ``cur/`` by base name (cur/ wins a duplicate)."""
    found: dict[str, tuple[str, str, float]] = {}
    for subdir in SUBDIRS:  # cur/ last: it wins when a name is in both
        try:
            entries = list(os.scandir(source / subdir))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_file():
                found[base_name(entry.name)] = (subdir, entry.name, entry.stat().st_mtime)
    return found


def _dovecot_messages(source: Path, uidlist: Uidlist | None, fmt: UidlFormat,
                      report: UserReport) -> list[_Message]:
    """Dovecot's POP3 view of ``source``: numbered messages in UID order, then the rest."""
    on_disk = _on_disk(source)
    messages: list[_Message] = []
    if uidlist is not None:
        for record in uidlist.records:
            where = on_disk.pop(record.key, None)
            if where is None:
                continue  # expunged since Dovecot last wrote the list
            uidl, saved = dovecot_uidl(record, uidlist, fmt)
            report.saved_uidls += saved
            messages.append(_Message(where[0], where[1], record.key, uidl, where[2]))
    elif on_disk:
        report.warnings.append(
            "no dovecot-uidlist: Dovecot never listed these messages, so mailbag's own UIDLs "
            "are used"
        )
    for key in sorted(on_disk, key=arrival_key):
        subdir, name, mtime = on_disk[key]
        messages.append(_Message(subdir, name, key, None, mtime))
        report.unlisted += 1
    report.messages = len(messages)
    report.uidls = sum(m.uidl is not None for m in messages)
    return messages


def _flags(message: _Message) -> str | None:
    """Maildir flag letters of a ``cur/`` file (None for ``new/``: never seen)."""
    if message.subdir == "new":
        return None
    info = message.filename.partition(":")[2]
    return info[2:] if info.startswith("2,") else ""


def _reader(path: Path) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        return await asyncio.to_thread(path.read_bytes)

    return read


async def _as_import(messages: list[_Message], source: Path) -> AsyncIterator[ImportMessage]:
    for m in messages:
        path = source / m.subdir / m.filename
        yield ImportMessage(key=m.key, read=_reader(path), uid=m.uidl, flags=_flags(m),
                            received=m.mtime, path=str(path))


def _account(entry: PasswdEntry, users: MigrationUsersFile | None, opts: Options,
             report: UserReport) -> None:
    if not entry.password:
        report.account = "skipped"
        report.warnings.append("no password in the passwd-file line; account not added")
        return
    scheme = split_scheme(entry.password)[0]
    if scheme not in READABLE_SCHEMES:
        report.warnings.append(
            f"password scheme {scheme} is not supported by mailbag; the account is added but "
            "cannot log in until `mailbag user passwd` sets a new password"
        )
    if users is None:
        report.account = "skipped"
        return
    if opts.dry_run:
        exists = users.lookup(entry.name) is not None
        report.account = "exists" if exists else "added"
        return
    report.account = "added" if users.add_line(entry.name, entry.line) else "exists"


def migrate_user(
    entry: PasswdEntry,
    *,
    store: Store,
    users: MigrationUsersFile | None,
    opts: Options,
    progress: Callable[[str], None] = lambda _line: None,
) -> UserReport:
    """Migrate one user; errors end up in the report, never as exceptions."""
    report = UserReport(entry.name)
    try:
        name = validate_username(entry.name)
        report.source = maildir_location(opts.maildir_template, user=name, home=entry.home)
        _account(entry, users, opts, report)
        source = report.source
        if not (source / "cur").is_dir() and not (source / "new").is_dir():
            report.warnings.append(f"no Maildir at {source}; nothing to move")
            return report
        uidlist = read_uidlist(source)
        messages = _dovecot_messages(source, uidlist, opts.uidl_format, report)
        options = ImportOptions(dry_run=opts.dry_run, replace_uids=opts.replace_uidls,
                                link=opts.mode == "link")

        def counted(done: int) -> None:
            progress(f"  {report.name}: {done}/{len(messages)} messages")

        result, report.verified = asyncio.run(
            import_user(store, name, _as_import(messages, source), options, counted))
        report.transferred, report.present = result.imported, result.present
        report.conflicts = result.conflicts
        report.warnings.extend(result.warnings)
        if report.conflicts:
            verb = "replaced" if opts.replace_uidls else "kept (see --replace-uidls)"
            report.warnings.append(
                f"{report.conflicts} messages already had a different migrated UIDL: {verb}"
            )
    except (MailbagError, OSError) as exc:
        if isinstance(exc, InvalidUsername | AuthError):
            report.error = f"{exc}"
        elif isinstance(exc, OSError):
            report.error = f"{exc.filename or ''}: {exc.strerror or exc}"
        else:
            report.error = str(exc)
    return report

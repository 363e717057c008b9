"""Carrying out a Dovecot -> mailbag migration, one user at a time.

For each passwd-file user: add the account to mailbag's users file (the
line is copied verbatim: the format is the same), bring the messages of the
Dovecot INBOX Maildir into the user's mailbag Maildir (hard links, copies,
or nothing when both are the same directory), and record every message's
Dovecot UIDL in the Maildir's ``mailbag-uidl`` file, which mailbag's
storage reads at every open (``storage.maildir.read_uidl_overrides``).  A
fresh Maildir also gets a ``mailbag.index`` in Dovecot's order, so message
numbers match too.  Finally the Maildir is opened through mailbag's own
storage code and its UIDL list compared with Dovecot's: the migration
proves its result instead of hoping.

Safe to re-run: files already there are skipped, existing accounts are kept,
and a UIDL mailbag already serves is never changed (unless asked), because
changing it would make clients download again.  ``dry_run`` reads and
reports everything and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
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
from mailbag.storage.maildir import MaildirStore, read_uidl_overrides
from mailbag.storage.maildir_index import Entry as IndexEntry
from mailbag.storage.maildir_index import (
    IndexData,
    Listing,
    read_index,
    write_index,
)
from mailbag.storage.maildir_names import (
    INDEX_FILE,
    LOCK_FILE,
    UIDL_OVERRIDE_FILE,
    arrival_key,
    derive_uidl,
    is_valid_uidl,
    wire_size_from_name,
)
from mailbag.wireform import wire_size

SUBDIRS = ("new", "cur")
DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True, slots=True)
class Options:
    """How to migrate (from the command line)."""

    maildir_template: str
    uidl_format: UidlFormat
    mode: str = "copy"  # "copy", "link" or "in-place" (decided per user when paths match)
    dry_run: bool = False
    replace_uidls: bool = False
    owner: tuple[int, int] | None = None  # chown what we create (running as root)


@dataclass(slots=True)
class UserReport:
    """What happened to one user; printed as one line by the command."""

    name: str
    source: Path | None = None
    target: Path | None = None
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
    uidl: str | None  # None: Dovecot never listed it; mailbag derives its own


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


def _dovecot_messages(source: Path, uidlist: Uidlist | None, fmt: UidlFormat,
                      report: UserReport) -> list[_Message]:
    """Dovecot's POP3 view of ``source``: numbered messages in UID order, then the rest."""
    on_disk: dict[str, tuple[str, str]] = {}
    for subdir in SUBDIRS:  # cur/ last: it wins when a name is in both
        try:
            names = os.listdir(source / subdir)
        except FileNotFoundError:
            continue
        for name in names:
            if not name.startswith(".") and (source / subdir / name).is_file():
                on_disk[base_name(name)] = (subdir, name)
    messages: list[_Message] = []
    if uidlist is not None:
        for record in uidlist.records:
            where = on_disk.pop(record.key, None)
            if where is None:
                continue  # expunged since Dovecot last wrote the list
            uidl, saved = dovecot_uidl(record, uidlist, fmt)
            report.saved_uidls += saved
            messages.append(_Message(where[0], where[1], record.key, uidl))
    elif on_disk:
        report.warnings.append(
            "no dovecot-uidlist: Dovecot never listed these messages, so mailbag's own UIDLs "
            "are used"
        )
    for key in sorted(on_disk, key=arrival_key):
        subdir, name = on_disk[key]
        messages.append(_Message(subdir, name, key, None))
        report.unlisted += 1
    report.messages = len(messages)
    report.uidls = sum(m.uidl is not None for m in messages)
    return messages


@contextlib.contextmanager
def _maildrop_lock(target: Path) -> Iterator[None]:
    """Hold mailbag's maildrop lock, so no POP3 session sees a half-migrated Maildir."""
    fd = os.open(target / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MailbagError(f"{target} is in use by a POP3 session; try again") from None
        yield
    finally:
        os.close(fd)


def _make_dirs(target: Path, owner: tuple[int, int] | None) -> None:
    missing = [p for p in (*reversed(target.parents), target) if not p.exists()]
    for path in missing:
        path.mkdir(mode=DIR_MODE)
        if owner:
            os.chown(path, *owner)
    for sub in ("tmp", "new", "cur"):
        path = target / sub
        if not path.exists():
            path.mkdir(mode=DIR_MODE)
            if owner:
                os.chown(path, *owner)


def _copy_file(src: Path, dst: Path, tmp_dir: Path, owner: tuple[int, int] | None) -> None:
    """Copy through ``tmp/`` (Maildir rule: a file appears in new/cur only when complete)."""
    tmp = tmp_dir / f"{dst.name.split(':', 1)[0]}.migrating"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb", closefd=False) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fd)
        if owner:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    st = src.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, dst)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
        if owner:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _existing_keys(target: Path) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for subdir in SUBDIRS:
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(target / subdir):
                found[base_name(name)] = (subdir, name)
    return found


def _transfer(messages: list[_Message], source: Path, target: Path, opts: Options,
              report: UserReport, progress: Callable[[str], None]) -> None:
    """Link or copy the files mailbag does not have yet (never overwriting one)."""
    present = _existing_keys(target)
    mode = opts.mode
    for done, message in enumerate(messages, 1):
        if message.key in present:
            report.present += 1
            continue
        src = source / message.subdir / message.filename
        dst = target / message.subdir / message.filename
        if not opts.dry_run:
            linked = False
            if mode == "link":
                try:
                    os.link(src, dst)
                    linked = True
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    report.warnings.append(f"cannot hard-link ({exc.strerror}); copying")
                    mode = "copy"
            if not linked:
                _copy_file(src, dst, target / "tmp", opts.owner)
        report.transferred += 1
        if done % 5000 == 0:
            progress(f"  {report.name}: {done}/{len(messages)} messages")
    if report.transferred and not opts.dry_run:
        for subdir in SUBDIRS:
            _fsync_dir(target / subdir)


def _merge_uidls(messages: list[_Message], target: Path, opts: Options,
                 report: UserReport) -> dict[str, str]:
    """The override table to write: Dovecot's UIDLs, never silently changing a served one."""
    existing = read_uidl_overrides(str(target)) if target.is_dir() else {}
    merged = dict(existing)
    seen: dict[str, str] = {}
    for message in messages:
        if message.uidl is None:
            continue
        if not is_valid_uidl(message.uidl):
            report.warnings.append(
                f"UIDL {message.uidl!r} of {message.key} is not valid POP3 "
                "(RFC 1939: 1-70 printable characters); mailbag's own UIDL is used"
            )
            continue
        if message.uidl in seen:
            report.warnings.append(f"duplicate UIDL {message.uidl!r}; mailbag uses its own "
                                   f"for {message.key}")
            continue
        seen[message.uidl] = message.key
        old = existing.get(message.key)
        if old is not None and old != message.uidl:
            report.conflicts += 1
            if not opts.replace_uidls:
                continue
        merged[message.key] = message.uidl
    if report.conflicts:
        verb = "replaced" if opts.replace_uidls else "kept (see --replace-uidls)"
        report.warnings.append(
            f"{report.conflicts} messages already had a different migrated UIDL: {verb}"
        )
    return merged


def _format_overrides(overrides: dict[str, str], order: list[str], fmt: str) -> bytes:
    lines = [
        "# UIDLs kept from Dovecot by `mailbag migrate dovecot` (pop3_uidl_format "
        f"{fmt}).",
        "# unique-name uidl; do not edit: POP3 clients remember these.",
    ]
    rank = {key: i for i, key in enumerate(order)}
    for key in sorted(overrides, key=lambda k: (rank.get(k, len(rank)), k)):
        lines.append(f"{key} {overrides[key]}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _write_index(messages: list[_Message], target: Path, owner: tuple[int, int] | None) -> None:
    """Seed mailbag's index in Dovecot's order, so message numbers match as well.

    Only for a Maildir mailbag has not indexed yet (an existing index already
    fixes the order clients saw from mailbag).  The recorded mtimes are zero,
    so the first open still lists the directories and trusts nothing blindly.
    """
    index_path = target / INDEX_FILE
    if read_index(str(index_path)) is not None:
        return
    listing = Listing()
    for message in messages:
        size = wire_size_from_name(message.key)
        if size is None:
            with open(target / message.subdir / message.filename, "rb") as f:
                size = wire_size(iter(lambda: f.read(1 << 20), b""))
        listing.append(IndexEntry(derive_uidl(message.key), message.subdir, message.filename,
                                  size))
    write_index(str(index_path), IndexData(listing, 0, 0, 0))
    if owner:
        os.chown(index_path, *owner)


async def _served_uidls(store: MaildirStore, user: str) -> list[str]:
    maildrop = await store.open_maildrop(user)
    try:
        return [m.uid for m in maildrop.messages]
    finally:
        await maildrop.close()


def _verify(store: MaildirStore, user: str, messages: list[_Message],
            overrides: dict[str, str], report: UserReport) -> None:
    """Open the Maildir the way the POP3 server will and compare UIDLs with Dovecot's."""
    expected = [overrides.get(m.key, derive_uidl(m.key)) for m in messages]
    served = asyncio.run(_served_uidls(store, user))
    migrated = set(expected)
    served_migrated = [uidl for uidl in served if uidl in migrated]
    if served_migrated != expected:
        missing = len(migrated - set(served))
        raise MailbagError(
            f"verification failed: mailbag would list {len(served_migrated)} of "
            f"{len(expected)} migrated messages ({missing} missing) or in another order"
        )
    report.verified = True


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
    store: MaildirStore,
    users: MigrationUsersFile | None,
    opts: Options,
    progress: Callable[[str], None] = lambda _line: None,
) -> UserReport:
    """Migrate one user; errors end up in the report, never as exceptions."""
    report = UserReport(entry.name)
    try:
        name = validate_username(entry.name)
        report.target = Path(store.maildir_path(name))
        report.source = maildir_location(opts.maildir_template, user=name, home=entry.home)
        _account(entry, users, opts, report)
        source, target = report.source, report.target
        if not (source / "cur").is_dir() and not (source / "new").is_dir():
            report.warnings.append(f"no Maildir at {source}; nothing to move")
            return report
        uidlist = read_uidlist(source)
        messages = _dovecot_messages(source, uidlist, opts.uidl_format, report)
        in_place = source.resolve() == target.resolve()
        if not opts.dry_run:
            _make_dirs(target, opts.owner)
        lock = contextlib.nullcontext() if opts.dry_run else _maildrop_lock(target)
        with lock:
            if not in_place:
                _transfer(messages, source, target, opts, report, progress)
            overrides = _merge_uidls(messages, target, opts, report)
            if not opts.dry_run:
                path = target / UIDL_OVERRIDE_FILE
                data = _format_overrides(overrides, [m.key for m in messages],
                                         opts.uidl_format.text)
                old = path.read_bytes() if path.exists() else None
                if overrides and data != old:
                    _write_atomic(path, data, opts.owner)
                _write_index(messages, target, opts.owner)
        if not opts.dry_run:
            _verify(store, name, messages, overrides, report)
            if opts.owner:  # the lock and index the checks created belong to the server
                for bookkeeping in (LOCK_FILE, INDEX_FILE, UIDL_OVERRIDE_FILE):
                    with contextlib.suppress(FileNotFoundError):
                        os.chown(target / bookkeeping, *opts.owner)
    except (MailbagError, OSError) as exc:
        if isinstance(exc, InvalidUsername | AuthError):
            report.error = f"{exc}"
        elif isinstance(exc, OSError):
            report.error = f"{exc.filename or ''}: {exc.strerror or exc}"
        else:
            report.error = str(exc)
    return report

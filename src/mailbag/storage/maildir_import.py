"""Importing messages into a Maildir, keeping their UIDLs (``Store.import_messages``).

Split from ``maildir`` (the store) to keep each module readable; the store
opens and locks the maildrop, this module does the rest under that lock:

* a message keeps its source key as its Maildir unique name when the key is
  a safe file name (a Dovecot base name is), so a re-run finds it by name
  and a Maildir shared with Dovecot keeps its files; otherwise the name is
  derived from the key, deterministically, so re-runs still find it;
* a UIDL to keep that differs from the one derived from the name goes into
  the durable override file ``mailbag-uidl`` (``unique-name uidl`` lines),
  which every open reads.  Entries are never removed: a kept UIDL whose
  message was deleted stays reserved, so a re-run does not bring the message
  back and the UIDL is never handed to another message;
* files are written like deliveries (``tmp/``, fsync, rename, fsync of the
  directory) or hard-linked; the index is rewritten in the import order with
  zero mtimes, so the next open lists the directories and trusts nothing.

The blocking parts run in worker threads (``MaildirImport`` methods are
called through ``asyncio.to_thread`` by the store).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from collections.abc import Callable

from mailbag.storage.base import ImportMessage, ImportOptions, ImportResult
from mailbag.storage.maildir_drop import fsync_dir, write_all
from mailbag.storage.maildir_index import Entry, IndexData, Listing, measure, read_index, scan
from mailbag.storage.maildir_index import write_index as _write_index
from mailbag.storage.maildir_names import (
    INDEX_FILE,
    UIDL_OVERRIDE_FILE,
    derive_uidl,
    is_valid_uidl,
    unique_name,
    wire_size_from_name,
)
from mailbag.wireform import wire_size

log = logging.getLogger(__name__)

FILE_MODE = 0o600

#: A source key used verbatim as a Maildir unique name: printable ASCII without
#: ``/`` (a path), ``:`` (starts the flags) and ``\\``, not starting with a dot.
_SAFE_NAME_RE = re.compile(r"[!-9;-\[\]-~]{1,200}\Z")

Chown = Callable[[str], None]


def read_uidl_overrides(path: str) -> dict[str, str]:
    """Read ``mailbag-uidl``: ``unique-name uidl`` per line, ``#`` comments.

    This is the hook for migrating from another server (e.g. Dovecot's
    ``dovecot-uidlist``) without making every client download all mail again.
    A missing file means no overrides; an unreadable one is an error, since
    silently ignoring it would change UIDLs.
    """
    try:
        with open(
            os.path.join(path, UIDL_OVERRIDE_FILE), encoding="utf-8", errors="surrogateescape"
        ) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return {}
    overrides: dict[str, str] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or not is_valid_uidl(fields[1]):
            log.warning("%s/%s:%d: ignoring malformed line", path, UIDL_OVERRIDE_FILE, lineno)
            continue
        overrides[unique_name(fields[0])] = fields[1]
    return overrides


def format_uidl_overrides(overrides: dict[str, str], order: list[str]) -> bytes:
    """The override file's bytes: keys in maildrop order, then any others sorted."""
    lines = [
        "# UIDLs kept by `mailbag migrate` (unique-name uidl).",
        "# Do not edit: POP3 clients remember these.",
    ]
    rank = {key: i for i, key in enumerate(order)}
    for key in sorted(overrides, key=lambda k: (rank.get(k, len(rank)), k)):
        lines.append(f"{key} {overrides[key]}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def name_for_key(key: str, received: float | None) -> str:
    """The Maildir unique name an imported message with source ``key`` gets.

    The key itself when it is a safe name; otherwise a name derived from it
    (arrival second first, so Maildir readers sort it sensibly), the same on
    every run.
    """
    if _SAFE_NAME_RE.match(key) and not key.startswith("."):
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"{int(received or 0)}.I{digest}.import"


class MaildirImport:
    """One import into one locked (or, in a dry run, merely read) Maildir."""

    def __init__(
        self,
        path: str,
        options: ImportOptions,
        *,
        fsync: bool,
        chown: Chown,
    ) -> None:
        self.path = path
        self.options = options
        self.result = ImportResult()
        self._fsync = fsync
        self._chown = chown
        self._link = options.link
        self._exists = os.path.isdir(os.path.join(path, "cur"))
        self._index_missing = True
        self.listing = Listing()
        if self._exists:
            index = read_index(os.path.join(path, INDEX_FILE))
            self._index_missing = index is None
            self.listing = scan(path, index, trust_mtimes=False).listing
        self._positions = {unique_name(n): i for i, n in enumerate(self.listing.filenames)}
        self._old_overrides = read_uidl_overrides(path) if self._exists else {}
        self.overrides = dict(self._old_overrides)
        self._used = set(self.overrides.values())
        self._used.update(self._served(pos) for pos in range(len(self.listing)))
        self._deleted_since = 0
        self._dirs_touched: set[str] = set()
        #: Listing positions of the messages given, in the order given.
        self._given: list[int] = []

    def _served(self, pos: int) -> str:
        key = unique_name(self.listing.filenames[pos])
        return self.overrides.get(key, self.listing.uids[pos])

    # -- per message -----------------------------------------------------------

    def plan(self, message: ImportMessage) -> str | None:
        """Decide what to do with ``message``; the unique name to store it under, or None.

        None means nothing to store (present already, or deleted since an
        earlier import); the result counters and UIDL list are updated here.
        """
        name = name_for_key(message.key, message.received)
        uid = message.uid
        if uid is not None and not is_valid_uidl(uid):
            self.result.warnings.append(
                f"UIDL {uid!r} of {message.key} is not valid POP3 (RFC 1939: 1-70 printable "
                "characters); mailbag's own UIDL is used")
            uid = None
        pos = self._positions.get(name)
        if pos is not None:
            self.result.present += 1
            self._given.append(pos)
            self._keep_uid_of_present(name, pos, uid)
            self.result.uids.append(self._served(pos))
            return None
        if name in self.overrides:
            self._deleted_since += 1  # imported earlier, deleted by its owner since
            return None
        derived = derive_uidl(name)
        if uid is not None and uid != derived:
            if uid in self._used:
                self.result.warnings.append(
                    f"UIDL {uid!r} of {message.key} is already used by another message; "
                    "mailbag uses its own")
            else:
                self.overrides[name] = uid
        served = self.overrides.get(name, derived)
        self._used.add(served)
        self.result.uids.append(served)
        self.result.imported += 1
        return name

    def _keep_uid_of_present(self, name: str, pos: int, uid: str | None) -> None:
        if uid is None or uid == self._served(pos):
            return
        if name in self.overrides:  # served under a UIDL kept by an earlier import
            self.result.conflicts += 1
            if not self.options.replace_uids:
                return
        elif uid in self._used:
            self.result.warnings.append(
                f"UIDL {uid!r} of {name} is already used by another message; kept its own")
            return
        self._used.discard(self._served(pos))
        self.overrides[name] = uid
        self._used.add(uid)

    def store(self, message: ImportMessage, name: str, data: bytes | None) -> None:
        """Write (or link) one planned message and append it to the listing.

        ``data`` is None only when linking ``message.path`` is to be tried.
        """
        subdir = "new" if message.flags is None else "cur"
        filename = name if message.flags is None else f"{name}:2,{message.flags}"
        target = os.path.join(self.path, subdir, filename)
        size = wire_size_from_name(name)
        if data is None and message.path is not None and self._try_link(message.path, target):
            if size is None:
                size = measure(target)
        else:
            if data is None:
                with open(message.path or "", "rb") as f:
                    data = f.read()
            self._write(target, data, message.received)
            if size is None:
                size = wire_size([data])
        self._dirs_touched.add(subdir)
        self._positions[name] = len(self.listing)
        self._given.append(len(self.listing))
        self.listing.append(Entry(derive_uidl(name), subdir, filename, size))

    @property
    def wants_link(self) -> bool:
        """True while hard links are asked for and have not failed yet."""
        return self._link

    def _try_link(self, source: str, target: str) -> bool:
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            self.result.warnings.append(f"cannot hard-link ({exc.strerror}); copying")
            self._link = False
            return False
        return True

    def _write(self, target: str, data: bytes, received: float | None) -> None:
        """tmp/ + fsync + rename: a file appears in new/ or cur/ only when complete."""
        tmp = os.path.join(self.path, "tmp", os.path.basename(target).split(":", 1)[0]
                           + ".importing")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            try:
                write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if received is not None:
                os.utime(tmp, (received, received))
            self._chown(tmp)
            os.rename(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- at the end --------------------------------------------------------------

    def finish(self) -> None:
        """Make it durable: fsync the directories, write overrides and the index."""
        if self._deleted_since:
            self.result.warnings.append(
                f"{self._deleted_since} messages were imported before and deleted since: "
                "not brought back")
        if self.options.dry_run:
            return
        if self._fsync:
            for subdir in sorted(self._dirs_touched):
                fsync_dir(os.path.join(self.path, subdir))
        if self._index_missing:
            self._adopt_given_order()
        order = [unique_name(n) for n in self.listing.filenames]
        if self.overrides != self._old_overrides:
            self._write_overrides(format_uidl_overrides(self.overrides, order))
        if self._dirs_touched or self._index_missing:
            index_path = os.path.join(self.path, INDEX_FILE)
            # Zero mtimes: the next open lists the directories (it keeps this order).
            _write_index(index_path, IndexData(self.listing, 0, 0, 0), fsync=self._fsync)
            self._chown(index_path)

    def _adopt_given_order(self) -> None:
        """No index yet, so no order any client saw from mailbag: take the source's.

        (A Maildir imported in place, or files that were already there, would
        otherwise be numbered by file name.)  Messages that were there and not
        given (delivered before the import) keep their place in front.
        """
        given = list(dict.fromkeys(self._given))
        taken = set(given)
        order = [p for p in range(len(self.listing)) if p not in taken] + given
        self.listing = Listing.of([self.listing.entry(p) for p in order])

    def _write_overrides(self, data: bytes) -> None:
        path = os.path.join(self.path, UIDL_OVERRIDE_FILE)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            write_all(fd, data)
            os.fsync(fd)  # durable data, not a cache: always fsynced
        finally:
            os.close(fd)
        self._chown(tmp)
        os.replace(tmp, path)
        fsync_dir(self.path)


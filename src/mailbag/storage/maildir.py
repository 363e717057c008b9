"""Maildir storage: one Maildir (``new/``, ``cur/``, ``tmp/``) per user.

Interoperability is the point of Maildir, so this backend reads what Postfix
``local``, procmail and Dovecot write (any unique name, with or without
Dovecot's ``,S=``/``,W=`` size fields, ``:2,FLAGS`` in ``cur/``) and leaves
the Maildir as they expect it: messages are never renamed, deliveries follow
the spec's tmp -> new protocol, and our own bookkeeping lives in three files
in the Maildir root that other programs ignore:

``mailbag.lock``
    ``flock``-ed for the life of a POP3 session.  A kernel lock, so a crash
    can never leave it stale; the file's mtime doubles as "last tmp cleanup".
``mailbag.index``
    A cache of arrival order, file names and wire sizes (see
    ``maildir_index``).  Losing it costs time, never correctness.
``mailbag-uidl`` (optional, written by an administrator or migration tool)
    ``unique-name uidl`` lines: UIDLs that must be kept from a previous
    server.  Durable data, so deliberately *not* part of the cache index.

Threading: every call that touches the filesystem more than trivially
(opening a maildrop = lock + scan + index write, delivering = write + two
fsyncs, deleting, reading chunks) runs in ``asyncio.to_thread`` so a slow
or cold disk stalls one session, not the whole event loop.  Only pure
computations (path templates, name parsing) run inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import io
import logging
import os
import string
import time
from collections.abc import AsyncIterable

from mailbag.errors import ConfigError, InvalidUsername, MaildropLocked, StorageError
from mailbag.storage.base import ImportMessage, ImportOptions, ImportResult, Usage
from mailbag.storage.maildir_drop import (
    SLOW_OPEN,
    MaildirMaildrop,
    fsync_dir,
    storage_errors,
    thread_disk_reads,
    write_all,
)
from mailbag.storage.maildir_import import MaildirImport, read_uidl_overrides
from mailbag.storage.maildir_index import IndexData, ScanResult, read_index, scan, write_index
from mailbag.storage.maildir_names import (
    INDEX_FILE,
    LOCK_FILE,
    UIDL_OVERRIDE_FILE,
    NameGenerator,
    derive_uidl,
    split_user,
    unique_name,
)
from mailbag.wireform import wire_size

__all__ = [
    "INDEX_FILE",
    "LOCK_FILE",
    "UIDL_OVERRIDE_FILE",
    "MaildirMaildrop",
    "MaildirStore",
    "read_uidl_overrides",
]

log = logging.getLogger(__name__)

#: The Maildir spec: "delete a file in tmp/ that has not been accessed in 36 hours".
TMP_MAX_AGE = 36 * 3600.0
#: Opening a maildrop looks at ``tmp/`` at most this often (seconds).
CLEANUP_INTERVAL = 3600.0

#: A maildrop opened within this many seconds is opened on the event loop
#: (its metadata is cached; see ``MaildirStore._inline_open``) ...
RECENT_OPEN = 300.0
#: ... if it held at most this many messages (a bigger scan is too long for the loop).
INLINE_MAX_MESSAGES = 1000
#: Maildrops remembered for that (about 100 bytes each).
RECENT_MAX = 20_000
#: After an inline open that waited for the disk: seconds of worker-thread opens only.
SLOW_DISK_BACKOFF = 60.0

DIR_MODE = 0o700
FILE_MODE = 0o600

_TEMPLATE_FIELDS = frozenset({"user", "local", "domain"})


def default_root(template: str) -> str:
    """The directory no maildrop may escape: the template's fixed part before its first field.

    ``/var/mail/{domain}/{local}`` -> ``/var/mail``; ``mail/{user}/Maildir`` -> ``mail``.
    The CLI uses the same function to check (and create) the mail root at startup.
    """
    prefix = template.split("{", 1)[0]
    return prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)


class MaildirStore:
    """Maildirs at ``root_template`` (``{user}``, ``{local}``, ``{domain}``).

    ``root`` is the directory no maildrop may escape; by default the
    directory part of the template before its first field
    (``/var/mail/{domain}/{local}`` -> ``/var/mail``).  ``trust_mtimes``
    enables the "directories unchanged, skip listing" shortcut; switch it off
    on filesystems with unreliable mtimes (NFS with skewed clocks).
    ``fsync=False`` is for benchmarks only.
    """

    def __init__(
        self,
        root_template: str,
        *,
        root: str | None = None,
        hostname: str | None = None,
        trust_mtimes: bool = True,
        fsync: bool = True,
        tmp_max_age: float = TMP_MAX_AGE,
        cleanup_interval: float = CLEANUP_INTERVAL,
    ) -> None:
        self._check_template(root_template)
        self._template = root_template
        if root is None:
            root = default_root(root_template)
        self._root = os.path.normpath(os.path.abspath(root or os.curdir))
        self._names = NameGenerator(hostname)
        self._trust_mtimes = trust_mtimes
        self._fsync = fsync
        self._tmp_max_age = tmp_max_age
        self._cleanup_interval = cleanup_interval
        self._recent: dict[str, float] = {}  # small maildrop's path -> time of its last open
        self._threads_until = 0.0
        self._owner: tuple[int, int] | None = None

    @staticmethod
    def _check_template(template: str) -> None:
        """Validate the template's fields (only known ones, at least one)."""
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigError(f"maildir template {template!r}: {exc}") from exc
        fields = {name for _, name, _, _ in parsed if name is not None}
        if not fields:
            raise ConfigError(f"maildir template {template!r} has no {{user}} field")
        if unknown := fields - _TEMPLATE_FIELDS:
            raise ConfigError(f"maildir template {template!r}: unknown fields {sorted(unknown)}")

    # -- paths ---------------------------------------------------------------

    def maildir_path(self, user: str) -> str:
        """The Maildir of ``user``; raises InvalidUsername for anything suspicious.

        User names were validated by the auth layer already; this is the
        last line of defence, because here a name becomes a path.
        """
        local, domain = split_user(user)
        path = self._template.format(user=user, local=local, domain=domain)
        path = os.path.normpath(os.path.abspath(path))
        if not path.startswith(self._root.rstrip(os.sep) + os.sep):
            raise InvalidUsername(f"maildir of {user!r} would escape {self._root}")
        return path

    def _ensure_dirs(self, path: str) -> None:
        """Create the Maildir and its three subdirectories (0700) if missing."""
        missing: list[str] = []
        if self._owner is not None:
            parent = path
            while not os.path.exists(parent) and parent != os.path.dirname(parent):
                missing.append(parent)
                parent = os.path.dirname(parent)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, DIR_MODE)
        for sub in ("tmp", "new", "cur"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(path, sub), DIR_MODE)
        if self._owner is not None:
            for created in (*missing, *(os.path.join(path, sub) for sub in ("tmp", "new", "cur"))):
                self._chown(created)

    # -- optional capabilities (base.SelfCheck, base.FileOwner) ----------------

    @property
    def root(self) -> str:
        """The directory every maildrop lives under."""
        return self._root

    def prepare(self) -> None:
        """Create the mail root, or fail naming the setting and the path."""
        try:
            os.makedirs(self._root, mode=DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"storage.maildir: cannot create {self._root}: {exc.strerror}") from None
        if not os.access(self._root, os.W_OK | os.X_OK):
            raise ConfigError(f"storage.maildir: {self._root} is not writable")

    def check(self) -> str:
        """Like ``prepare`` but creating nothing: could the mail root be used?"""
        existing = self._root
        while not os.path.exists(existing) and existing != os.path.dirname(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(f"storage.maildir: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"storage.maildir: {existing} is not writable")
        if existing != self._root:
            return f"storage: {self._root} (will be created)"
        return f"storage: {self._root}"

    def problems(self) -> list[str]:
        """``[]`` while this process can store mail under the root."""
        if os.access(self._root, os.W_OK | os.X_OK):
            return []
        return [f"mail root {self._root} not writable"]

    def set_owner(self, uid: int, gid: int) -> None:
        """Files and directories created from now on belong to ``uid:gid``."""
        self._owner = (uid, gid)

    def _chown(self, path: str) -> None:
        if self._owner is not None:
            os.chown(path, *self._owner)

    # -- Store interface -----------------------------------------------------

    async def open_maildrop(self, user: str) -> MaildirMaildrop:
        """Lock and snapshot ``user``'s Maildir.

        In a worker thread (it scans), except for a small maildrop opened a
        moment ago (``_inline_open``).
        """
        path = self.maildir_path(user)
        now = time.monotonic()
        if now >= self._threads_until and self._recent.get(path, 0.0) > now - RECENT_OPEN:
            maildrop = await self._inline_open(user, path)
        else:
            maildrop = await asyncio.to_thread(self._open_sync, user, path)
        self._remember(path, now, len(maildrop.messages))
        return maildrop

    def _remember(self, path: str, now: float, messages: int) -> None:
        """Note a small maildrop's open time (bounded: the oldest half goes when full)."""
        if messages > INLINE_MAX_MESSAGES:
            self._recent.pop(path, None)
            return
        if len(self._recent) >= RECENT_MAX and path not in self._recent:
            for old in list(self._recent)[: RECENT_MAX // 2]:
                del self._recent[old]
        self._recent.pop(path, None)  # re-insert: dict order is age order
        self._recent[path] = now

    async def _inline_open(self, user: str, path: str) -> MaildirMaildrop:
        """Open on the event loop a maildrop whose metadata is certainly cached.

        A small maildrop opened within ``RECENT_OPEN`` seconds has its
        directories, lock file and index in the page cache, so its open is
        a dozen system calls that never wait for a disk, far cheaper than
        the worker-thread hand-off itself (~70 us of CPU on a small VM, the
        largest single cost of a short POP3 session).  Whatever may wait
        for the disk still goes to a thread: the index write (it fsyncs) and
        the hourly ``tmp/`` cleanup.  Should an open turn out slow *and* the
        loop thread read from the device meanwhile (memory pressure evicted
        the cache), every open goes to threads for ``SLOW_DISK_BACKOFF``.
        """
        reads = thread_disk_reads()
        started = time.perf_counter()
        lock, overrides, result, cleanup_due = self._open_parts(user, path, cleanup=False)
        if time.perf_counter() - started > SLOW_OPEN and (
            reads is None or thread_disk_reads() != reads
        ):
            self._threads_until = time.monotonic() + SLOW_DISK_BACKOFF
        try:
            if cleanup_due or result.needs_write:
                await asyncio.to_thread(
                    self._finish_open, path, lock, result if result.needs_write else None,
                    cleanup_due,
                )
        except BaseException:
            lock.close()
            raise
        return MaildirMaildrop(path, lock, result.listing, overrides, fsync=self._fsync)

    def _open_sync(self, user: str, path: str) -> MaildirMaildrop:
        lock, overrides, result, _ = self._open_parts(user, path, cleanup=True)
        try:
            self._finish_open(path, lock, result if result.needs_write else None, False)
        except BaseException:
            lock.close()
            raise
        return MaildirMaildrop(path, lock, result.listing, overrides, fsync=self._fsync)

    def _open_parts(
        self, user: str, path: str, *, cleanup: bool
    ) -> tuple[io.FileIO, dict[str, str], ScanResult, bool]:
        """Lock, read the overrides and the index, scan; nothing here writes or fsyncs.

        Returns the lock, the UIDL overrides, the scan, and whether the
        ``tmp/`` cleanup is due (with ``cleanup=True`` it has run already).
        """
        with storage_errors("open maildrop", path):
            try:
                lock = _acquire_lock(path, user)
            except FileNotFoundError:  # a new maildrop: create it, then lock
                self._ensure_dirs(path)
                lock = _acquire_lock(path, user)
            self._chown(os.path.join(path, LOCK_FILE))
        try:
            cleanup_due = self._cleanup_due(path, lock)
            if cleanup_due and cleanup:
                self._cleanup(path, lock)
                cleanup_due = False
            with storage_errors("open maildrop", path):
                overrides = read_uidl_overrides(path)
                previous = read_index(os.path.join(path, INDEX_FILE))
                try:
                    result = scan(path, previous, trust_mtimes=self._trust_mtimes)
                except FileNotFoundError:  # new/ or cur/ missing: recreate, then scan
                    self._ensure_dirs(path)
                    result = scan(path, previous, trust_mtimes=self._trust_mtimes)
        except BaseException:
            lock.close()
            raise
        return lock, overrides, result, cleanup_due

    def _finish_open(
        self, path: str, lock: io.FileIO, result: ScanResult | None, cleanup: bool
    ) -> None:
        """The parts of an open that may wait for the disk: tmp cleanup, index write."""
        if cleanup:
            self._cleanup(path, lock)
        if result is not None:
            index_path = os.path.join(path, INDEX_FILE)
            try:
                write_index(index_path, result.index, fsync=self._fsync)
                self._chown(index_path)
            except OSError as exc:
                log.warning("cannot write maildir index %s: %s", index_path, exc)

    async def deliver(self, user: str, message: bytes) -> str:
        """Deliver atomically: tmp/ + fsync, link into new/, fsync new/.

        A reader never sees a partial file because a file appears in
        ``new/`` only by a link of a complete, fsynced file; a crash leaves
        at most a leftover in ``tmp/``, which ``cleanup_tmp`` removes.
        """
        path = self.maildir_path(user)
        return await asyncio.to_thread(self._deliver_sync, path, bytes(message))

    def _deliver_sync(self, path: str, message: bytes) -> str:
        with storage_errors("deliver to", path):
            self._ensure_dirs(path)
            name = self._names.make(len(message), wire_size([message]))
            tmp = os.path.join(path, "tmp", name)
            new = os.path.join(path, "new", name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                try:
                    write_all(fd, message)
                    if self._fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    os.link(tmp, new)
                except OSError as exc:
                    # Filesystems without hard links: rename is atomic too.
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                    os.rename(tmp, new)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if self._fsync:
                fsync_dir(os.path.join(path, "new"))
        return derive_uidl(unique_name(name))

    async def usage(self, user: str) -> Usage:
        """Messages and wire octets now stored; never waits for a session.

        Uses the index and file names; reads only messages that neither
        carries a size for, and caches what it read in the index when no
        session holds the maildrop.  Never creates the Maildir.
        """
        path = self.maildir_path(user)
        return await asyncio.to_thread(self._usage_sync, path)

    def _usage_sync(self, path: str) -> Usage:
        if not os.path.isdir(os.path.join(path, "cur")):
            return Usage(0, 0)
        index_path = os.path.join(path, INDEX_FILE)
        with storage_errors("measure maildrop", path):
            result = scan(path, read_index(index_path), trust_mtimes=self._trust_mtimes)
        if result.needs_write:
            self._save_if_unlocked(path, index_path, result.index)
        return Usage(len(result.listing), sum(result.listing.sizes))

    def _save_if_unlocked(self, path: str, index_path: str, index: IndexData) -> None:
        """Cache a scan when no session holds the maildrop.

        Quota checks run once per delivery; without this, a maildrop that
        Postfix fills and nobody reads would be re-read on every check.
        Only the lock holder may write the index, so when a session is
        open we simply skip it.  Writing a scan that is already outdated is
        harmless: its recorded mtimes no longer match, so the next open
        lists the directories again.
        """
        try:
            lock = _acquire_lock(path, "")
        except (MaildropLocked, OSError):
            return
        try:
            write_index(index_path, index, fsync=self._fsync)
        except OSError as exc:
            log.warning("cannot write maildir index %s: %s", index_path, exc)
        finally:
            lock.close()

    async def import_messages(
        self,
        user: str,
        messages: AsyncIterable[ImportMessage],
        options: ImportOptions | None = None,
    ) -> ImportResult:
        """Import under the maildrop lock (see ``maildir_import`` for how).

        A dry run takes no lock and creates nothing: it only reads.
        """
        options = options or ImportOptions()
        path = self.maildir_path(user)
        lock = None
        if not options.dry_run:
            lock = await asyncio.to_thread(self._lock_for_import, user, path)
        try:
            with storage_errors("import into", path):
                job = await asyncio.to_thread(
                    MaildirImport, path, options, fsync=self._fsync, chown=self._chown
                )
            async for message in messages:
                name = job.plan(message)
                if name is None or options.dry_run:
                    continue
                data = None
                if not (job.wants_link and message.path is not None):
                    data = await message.read()
                with storage_errors("import into", path):
                    await asyncio.to_thread(job.store, message, name, data)
            with storage_errors("import into", path):
                await asyncio.to_thread(job.finish)
        finally:
            if lock is not None:
                lock.close()
        return job.result

    def _lock_for_import(self, user: str, path: str) -> io.FileIO:
        with storage_errors("import into", path):
            self._ensure_dirs(path)
            lock = _acquire_lock(path, user)
            self._chown(os.path.join(path, LOCK_FILE))
        return lock

    # -- maintenance ---------------------------------------------------------

    async def cleanup_tmp(self, user: str, max_age: float | None = None) -> int:
        """Remove ``tmp/`` files untouched for ``max_age`` seconds; return how many.

        Safe without the lock: a delivery in progress touches its file far
        more recently than 36 hours ago.
        """
        path = self.maildir_path(user)
        age = self._tmp_max_age if max_age is None else max_age
        return await asyncio.to_thread(_cleanup_tmp, path, age)

    def _cleanup_due(self, path: str, lock: io.FileIO) -> bool:
        """True when the last ``tmp/`` cleanup (the lock file's mtime) is old enough.

        One ``fstat`` per open in the common case.
        """
        try:
            return time.time() - os.fstat(lock.fileno()).st_mtime >= self._cleanup_interval
        except OSError as exc:
            log.warning("tmp cleanup in %s failed: %s", path, exc)
            return False

    def _cleanup(self, path: str, lock: io.FileIO) -> None:
        """Run ``cleanup_tmp`` and record the time in the lock file's mtime."""
        try:
            _cleanup_tmp(path, self._tmp_max_age)
            os.utime(lock.fileno())
        except (OSError, StorageError) as exc:
            # Housekeeping must never stand between a user and their mail.
            log.warning("tmp cleanup in %s failed: %s", path, exc)


def _acquire_lock(path: str, user: str) -> io.FileIO:
    """Take the exclusive, non-blocking flock on the maildrop's lock file.

    Held in a FileIO so that a forgotten Maildrop still releases the lock
    when it is garbage-collected.  A new lock file gets mtime 0 so the first
    open also runs the tmp cleanup.
    """
    lock_path = os.path.join(path, LOCK_FILE)
    try:  # the usual case first: one system call
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        created = False
    except FileNotFoundError:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            created = True
        except FileExistsError:  # created by a concurrent open
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            created = False
    lock = io.FileIO(fd, "r+", closefd=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if created:
            os.utime(fd, ns=(0, 0))
    except BlockingIOError:
        lock.close()
        raise MaildropLocked(f"maildrop of {user!r} is in use") from None
    except BaseException:
        lock.close()
        raise
    return lock


def _cleanup_tmp(path: str, max_age: float) -> int:
    tmp = os.path.join(path, "tmp")
    cutoff = time.time() - max_age
    removed = 0
    with storage_errors("clean up", tmp):
        try:
            it = os.scandir(tmp)
        except FileNotFoundError:
            return 0
        with it:
            for de in it:
                try:
                    if de.is_dir(follow_symlinks=False):
                        continue
                    st = de.stat(follow_symlinks=False)
                    if max(st.st_atime, st.st_mtime) < cutoff:
                        os.unlink(de.path)
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("cannot remove stale %s: %s", de.path, exc.strerror)
    return removed


"""An open, locked Maildir: the POP3 session's view of one maildrop.

Split from ``maildir`` (the store: paths, locking, delivery) to keep each
module readable.  Every method that touches the disk more than trivially
runs in ``asyncio.to_thread``; ``read`` explains the one exception (page-cache hits).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import resource
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType

from mailbag.errors import MessageGone, StorageError
from mailbag.storage.base import DeleteResult, MessageInfo, MessageList
from mailbag.storage.maildir_index import IndexData, Listing, locate, write_index
from mailbag.storage.maildir_names import INDEX_FILE, unique_name

log = logging.getLogger(__name__)


@contextlib.contextmanager
def storage_errors(action: str, path: str) -> Iterator[None]:
    """Turn any OSError into a StorageError naming the action and the path.

    The session maps StorageError to ``-ERR [SYS/TEMP]``; a raw OSError would
    be an internal error.  The message is for the administrator's log.
    """
    try:
        yield
    except OSError as exc:
        where = exc.filename if isinstance(exc.filename, str) else path
        raise StorageError(f"cannot {action}: {where}: {exc.strerror or exc}") from exc


def read_error(path: str, exc: OSError) -> StorageError:
    """``storage_errors("read message", path)`` as a plain function, for hot paths."""
    where = exc.filename if isinstance(exc.filename, str) else path
    return StorageError(f"cannot read message: {where}: {exc.strerror or exc}")


def fsync_dir(path: str) -> None:
    """fsync a directory so a link/rename/unlink in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``; ``os.write`` may write less than asked."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


#: Octets per read when streaming a message: few calls per message, bounded memory.
READ_CHUNK = 256 * 1024

#: An open slower than this (seconds) may have hit the disk (see ``_slow_open``).
SLOW_OPEN = 0.002
#: Slow opens without disk reads (the thread was merely preempted) tolerated per session.
PREEMPTED_OPENS = 3

_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)


def thread_disk_reads() -> int | None:
    """Blocks this thread has read from storage devices so far; None where unknown."""
    if _RUSAGE_THREAD is None:
        return None
    return resource.getrusage(_RUSAGE_THREAD).ru_inblock

_NOWAIT_FLAGS = getattr(os, "RWF_NOWAIT", 0)
_nowait_usable = [bool(_NOWAIT_FLAGS)]
_buffers = threading.local()


def _read_cached(fd: int, size: int, offset: int) -> bytes | None:
    """Read without waiting for the disk; None when the data is not in the page cache.

    ``preadv`` with ``RWF_NOWAIT`` (Linux 4.14+) fails with EAGAIN instead of
    blocking, so the usual, cached case costs one system call on the event
    loop, and only a real disk read pays for a worker thread.  Where the flag
    is unsupported (other systems, some filesystems) this always says None.
    """
    if not _nowait_usable[0]:
        return None
    # One reused buffer per thread: a fresh bytearray is zero-filled, and
    # zeroing 256 KiB to read a 10 KB message cost more than the read.
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = bytearray(max(size, READ_CHUNK))
    view = memoryview(buf)[:size]
    try:
        n = os.preadv(fd, [view], offset, _NOWAIT_FLAGS)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            _nowait_usable[0] = False
            return None
        raise
    return bytes(view[:n])


class MaildirMaildrop:
    """A locked Maildir with the message list fixed at open.

    Messages are addressed by position in the open-time ``Listing``; the
    ``uid -> position`` map is the only per-message structure built at open.
    """

    def __init__(
        self,
        path: str,
        lock: io.FileIO,
        listing: Listing,
        overrides: dict[str, str],
        *,
        fsync: bool = True,
    ) -> None:
        self._path = path
        self._lock: io.FileIO | None = lock
        self._fsync = fsync
        self._inline_opens = True
        self._disk_reads: int | None = None  # the loop thread's count before inline opens
        self._preempted = 0
        self._listing = listing
        self._deleted: set[int] = set()
        # uid -> position, built on first use: a session that only lists
        # (STAT, UIDL, QUIT) never needs it, and at 100,000 messages it costs
        # more than reading the index.
        self._pos_map: dict[str, int] | None = None
        uids = listing.uids
        if overrides or len(set(uids)) != len(uids):
            self._pos_map = {}
            for pos, derived in enumerate(uids):
                uid = overrides.get(unique_name(listing.filenames[pos]), derived)
                if uid in self._pos_map:
                    log.warning("%s: duplicate UIDL %s; using %s", path, uid, derived)
                    uid = derived
                if uid not in self._pos_map:  # else a duplicate file: list it once
                    self._pos_map[uid] = pos
            # dict order is listing order, so the snapshot is in arrival order.
            sizes = listing.sizes
            self._messages = MessageList(
                list(self._pos_map), [sizes[p] for p in self._pos_map.values()]
            )
        else:
            # The common case: the snapshot is the listing's own columns (never
            # mutated: ``Listing.move`` changes only where a file lives).
            self._messages = MessageList(uids, listing.sizes)

    @property
    def _pos(self) -> dict[str, int]:
        if self._pos_map is None:
            self._pos_map = dict(zip(self._listing.uids, range(len(self._listing)), strict=True))
        return self._pos_map

    @property
    def path(self) -> str:
        """The Maildir directory (for logs and administration tools)."""
        return self._path

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open, in arrival order."""
        return self._messages

    def _position(self, uid: str) -> int:
        if self._lock is None:
            raise StorageError(f"maildrop {self._path} is closed")
        pos = self._pos.get(uid)
        if pos is None or pos in self._deleted:
            raise MessageGone(f"no message {uid} in {self._path}")
        return pos

    async def read(self, uid: str, *, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """Stream the file as stored, up to ``chunk_size`` octets per chunk.

        A cold disk can take milliseconds per read and the event loop serves
        every other session, so nothing here may wait for the disk on the
        loop: the open and the first read run in a worker thread (one
        hand-off per message), later reads are tried straight from the page
        cache (``_read_cached``) and go to a worker thread only on a miss.
        Hand-offs, not bytes, were what limited RETR throughput.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        pos = self._position(uid)
        opened = self._open_cached(pos, chunk_size) if self._inline_opens else None
        if opened is None:
            fd, chunk = await asyncio.to_thread(self._open_and_read, uid, chunk_size)
        else:
            fd, first = opened
            try:
                with storage_errors("read message", self._path):
                    chunk = first if first is not None else await asyncio.to_thread(
                        os.pread, fd, chunk_size, 0
                    )
            except BaseException:
                os.close(fd)
                raise
        try:
            offset = 0
            while chunk:
                offset += len(chunk)
                yield chunk
                with storage_errors("read message", self._path):
                    cached = _read_cached(fd, chunk_size, offset)
                    if cached is None:
                        cached = await asyncio.to_thread(os.pread, fd, chunk_size, offset)
                chunk = cached
        finally:
            os.close(fd)

    async def read_whole(self, uid: str, limit: int) -> bytes | None:
        """The whole message if it is at most ``limit`` octets (``base.WholeReader``), else None.

        One open, ``fstat`` and read: the size known from ``fstat`` ends the
        message without the extra read that finds the end of a stream.  On
        the event loop when the file is cached (as ``read``), else in a
        worker thread.  This runs once per small RETR, so it avoids the
        generator-based ``storage_errors`` context and ``os.path.join`` (a few
        microseconds each per message).
        """
        pos = self._position(uid)
        if self._inline_opens:
            opened = self._open_cached(pos, 0)
            if opened is not None:
                fd = opened[0]
                try:
                    size = os.fstat(fd).st_size
                    if size > limit:
                        return None
                    data = _read_cached(fd, size, 0) if size else b""
                    if data is None:
                        data = await asyncio.to_thread(os.pread, fd, size, 0)
                except OSError as exc:
                    raise read_error(self._path, exc) from exc
                finally:
                    os.close(fd)
                # A size that changed under us (never for Maildir files): stream it.
                return data if len(data) == size else None
        return await asyncio.to_thread(self._read_whole_sync, uid, limit)

    def _read_whole_sync(self, uid: str, limit: int) -> bytes | None:
        fd = self._open_message(uid)
        try:
            with storage_errors("read message", self._path):
                size = os.fstat(fd).st_size
                if size > limit:
                    return None
                data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        return data if len(data) == size else None

    def _open_cached(self, pos: int, size: int) -> tuple[int, bytes | None] | None:
        """Open on the event loop when that is cheap; None means "use a worker thread".

        Opening a file whose directory entry and inode are cached takes
        microseconds, much less than a thread hand-off, and it is the common
        case (the maildrop was just listed or indexed).  If an open turns out
        slow (the metadata came from disk), this maildrop stops opening
        inline, so a cold disk stalls the loop at most once per session.  A
        renamed file goes to the worker thread, which can search for it.
        """
        if self._disk_reads is None:
            self._disk_reads = thread_disk_reads()
        started = time.perf_counter()
        try:
            fd = os.open(self._file(pos), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        if time.perf_counter() - started > SLOW_OPEN:
            self._slow_open()
        if not size:
            return fd, None
        try:
            return fd, _read_cached(fd, size, 0)
        except OSError:
            os.close(fd)
            return None

    def _slow_open(self) -> None:
        """An inline open took long: stop opening inline if it waited for the disk.

        On a busy machine the loop thread is also simply preempted now and
        then, and treating that as a cold disk sent every later message of
        the session through a worker thread (about 5x the CPU per small
        message).  Where the kernel counts this thread's block reads, an open
        that read nothing from the device is forgiven a few times; elsewhere
        (or with reads) inline opens stop at once.
        """
        reads = thread_disk_reads()
        if reads is None or reads != self._disk_reads or self._preempted >= PREEMPTED_OPENS:
            self._inline_opens = False
        else:
            self._preempted += 1

    def _open_and_read(self, uid: str, size: int) -> tuple[int, bytes]:
        """Open the message and read its first chunk (in a worker thread)."""
        fd = self._open_message(uid)
        try:
            with storage_errors("read message", self._path):
                return fd, os.pread(fd, size, 0)
        except BaseException:
            os.close(fd)
            raise

    def _open_message(self, uid: str) -> int:
        """Open the message file, following it if another program renamed it."""
        pos = self._position(uid)
        with storage_errors("open message", self._path):
            try:
                return os.open(self._file(pos), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not self._relocate(pos):
                    raise MessageGone(f"message {uid} vanished from {self._path}") from None
                try:
                    return os.open(self._file(pos), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise MessageGone(f"message {uid} vanished from {self._path}") from None

    def _relocate(self, pos: int) -> bool:
        """Find a file that moved (new -> cur, flags changed); False if it is gone."""
        where = locate(self._path, unique_name(self._listing.filenames[pos]))
        if where is None:
            return False
        self._listing.move(pos, *where)
        return True

    def _file(self, pos: int) -> str:
        # Not os.path.join (Python code, about a microsecond): the parts are
        # "new"/"cur" and a file name, never absolute, never holding a "/".
        listing = self._listing
        return f"{self._path}/{listing.subdirs[pos]}/{listing.filenames[pos]}"

    async def delete(self, uids: Sequence[str]) -> DeleteResult:
        """Unlink the messages, fsync, update the index (in a worker thread)."""
        if self._lock is None:
            raise StorageError(f"maildrop {self._path} is closed")
        return await asyncio.to_thread(self._delete_sync, list(uids))

    def _delete_sync(self, uids: list[str]) -> DeleteResult:
        deleted = 0
        failed: list[str] = []
        touched: set[str] = set()
        for uid in uids:
            pos = self._pos.get(uid)
            if pos is None:
                failed.append(uid)
                continue
            if pos not in self._deleted:
                try:
                    touched.add(self._unlink(pos))
                except OSError as exc:
                    log.warning("cannot delete %s: %s", self._file(pos), exc.strerror)
                    failed.append(uid)
                    continue
                self._deleted.add(pos)
            deleted += 1
        touched.discard("")
        for subdir in touched:
            try:
                if self._fsync:
                    fsync_dir(os.path.join(self._path, subdir))
            except OSError as exc:
                log.warning("cannot fsync %s/%s: %s", self._path, subdir, exc.strerror)
        self._save_index()
        return DeleteResult(deleted, tuple(failed))

    def _unlink(self, pos: int) -> str:
        """Unlink one message; return its subdir, or "" if it was already gone."""
        try:
            os.unlink(self._file(pos))
        except FileNotFoundError:
            if not self._relocate(pos):
                return ""
            try:
                os.unlink(self._file(pos))
            except FileNotFoundError:
                return ""
        return self._listing.subdirs[pos]

    def _save_index(self) -> None:
        """Record the remaining messages, with mtimes that force the next listing.

        We cannot record the directories' current mtimes: a delivery may
        have happened since our snapshot, and recording "now" would hide it.
        """
        index = IndexData(self._listing.without(self._deleted), -1, -1, 0)
        try:
            write_index(os.path.join(self._path, INDEX_FILE), index, fsync=self._fsync)
        except OSError as exc:
            log.warning("cannot write maildir index in %s: %s", self._path, exc.strerror)

    async def close(self) -> None:
        """Release the lock (closing the descriptor drops the flock)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def __aenter__(self) -> MaildirMaildrop:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

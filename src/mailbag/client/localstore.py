"""Where ``fetch`` puts mail: a Maildir or an mbox, written crash-safely and in batches.

``mailbox.Maildir.add`` and ``mailbox.mbox.add`` take a whole message in
memory and never fsync; ``fetch`` may delete the server's copy, so it needs
a local write that is on disk before DELE.  Both stores here take a
*producer* (a function that streams the message into a sink), so RETR goes
straight from the socket to the file.

Exactly-once delivery across a crash uses a small journal (the UIDL state
file): ``B uid where`` is written *before* the message can become visible,
``D uid where`` once it is durable.  Durability is batched and overlapped
with the download: ``seal`` hands the batch written so far to a few
background threads that fsync it (ext4 and friends commit concurrent
fsyncs together) while the next batch streams in, and the following
``seal`` or ``flush`` finishes it -- for Maildir: rename the fsynced files
from ``tmp/`` into ``new/``, fsync ``new/``, then the D lines.  Both
return the UIDs that just became durable: only those may be deleted on the
server.  On the next run a ``B`` without ``D`` is settled: for Maildir, the
message counts as stored iff the final file exists (it is renamed only
after its fsync); for mbox, the file is truncated back to the earliest
pending offset, removing partial appends.  Nothing is lost (the server
still has the message: DELE is only sent after ``D``) and nothing is
duplicated.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mailbag.errors import ConfigError

Producer = Callable[[Callable[[bytes], object]], int]
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
#: A line start that may still turn into ">*From " once more bytes arrive.
_FROM_PREFIX = re.compile(rb">*(F(r(o(m)?)?)?)?")
_COUNTER = itertools.count(1)
#: Partial line held back by LocalLines before it is passed on in pieces.
MAX_PARTIAL = 64 * 1024
#: Threads fsyncing a sealed batch (concurrent fsyncs share journal commits).
SYNC_THREADS = 8


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalLines:
    """Streaming CRLF -> LF conversion, optionally with mboxrd ``>From`` quoting.

    Works on whole chunks (``bytes.replace`` and one regex per chunk) and
    keeps the incomplete last line for the next call, so a CRLF or a
    ``From `` split across chunks is still seen.
    """

    __slots__ = ("_at_start", "_mboxrd", "_tail")

    def __init__(self, *, mboxrd: bool = False) -> None:
        self._tail = b""
        self._at_start = True
        self._mboxrd = mboxrd

    def _convert(self, data: bytes, at_start: bool) -> bytes:
        data = data.replace(b"\r\n", b"\n")
        if self._mboxrd and b"From " in data:
            if at_start:
                data = _FROM_LINE.sub(rb">\1", data)
            else:
                head, nl, rest = data.partition(b"\n")
                data = head + nl + _FROM_LINE.sub(rb">\1", rest)
        return data

    def feed(self, chunk: bytes) -> bytes:
        """Convert the complete lines now available."""
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            undecided = self._at_start and _FROM_PREFIX.fullmatch(data[:MAX_PARTIAL * 16])
            if len(data) <= MAX_PARTIAL or undecided:
                self._tail = data
                return b""
            # A long line whose start is decided: pass it on, but keep a final
            # CR in case its LF comes next.
            out = self._convert(data, self._at_start)
            self._at_start = False
            if out.endswith(b"\r"):
                self._tail, out = b"\r", out[:-1]
            else:
                self._tail = b""
            return out
        lines, self._tail = data[: cut + 1], data[cut + 1 :]
        out = self._convert(lines, self._at_start)
        self._at_start = True
        return out

    def finish(self) -> bytes:
        """The rest, ending in exactly one newline."""
        out = self._convert(self._tail, self._at_start) if self._tail else b""
        self._tail = b""
        if out and not out.endswith(b"\n"):
            out += b"\n"
        return out


class Journal:
    """Append-only UIDL state: which server messages are safely stored here."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = {}
        self.pending: dict[str, str] = {}
        if path.exists():
            for line in path.read_text("utf-8").splitlines():
                kind, _, rest = line.partition("\t")
                uid, _, where = rest.partition("\t")
                if kind == "D":
                    self.done[uid] = where
                    self.pending.pop(uid, None)
                elif kind == "B":
                    self.pending[uid] = where
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def begin(self, uid: str, where: str, *, sync: bool = True) -> None:
        """Record intent before the store changes (fsync unless batched)."""
        os.write(self._fd, f"B\t{uid}\t{where}\n".encode())
        if sync:
            os.fsync(self._fd)
        self.pending[uid] = where

    def begin_many(self, items: list[tuple[str, str]]) -> None:
        """B lines for a batch in one write, not synced (see MaildirStore.flush)."""
        if items:
            os.write(self._fd, "".join(f"B\t{u}\t{w}\n" for u, w in items).encode())
            self.pending.update(items)

    def commit(self, items: list[tuple[str, str]]) -> None:
        """Record that these messages are durable in the store: one fsync."""
        if not items:
            return
        os.write(self._fd, "".join(f"D\t{u}\t{w}\n" for u, w in items).encode())
        os.fsync(self._fd)
        for uid, where in items:
            self.pending.pop(uid, None)
            self.done[uid] = where

    def compact(self, keep: set[str]) -> None:
        """Forget UIDs no longer on the server (like fetchmail), atomically."""
        if set(self.done) <= keep and not self.pending:
            return
        self.done = {u: w for u, w in self.done.items() if u in keep}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(f"D\t{u}\t{w}\n" for u, w in self.done.items())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.pending.clear()

    def close(self) -> None:
        """Release the file descriptor."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _host_part() -> str:
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


@dataclass(slots=True)
class _Written:
    """A Maildir message written to tmp/ and not yet durable."""

    uid: str
    fd: int
    tmp: str
    where: str


class _Syncer:
    """A small thread pool for fsync, created on first use."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def fsync(self, fd: int) -> Future[None]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="mailbag-fsync")
        return self._pool.submit(os.fsync, fd)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class MaildirStore:
    """Deliver into ``new/`` by the Maildir protocol: write tmp/, fsync, rename."""

    kind = "maildir"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: list[_Written] = []
        self._sealed: list[_Written] = []
        self._syncs: list[Future[None]] = []
        self._syncer = _Syncer()
        self._host = _host_part()
        self._pid = os.getpid()
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp_dir, self._root_dir = str(root / "tmp"), str(root)

    @property
    def unsynced(self) -> int:
        """Messages written but not yet durable."""
        return len(self._open) + len(self._sealed)

    def settle(self, journal: Journal) -> None:
        """Resolve journal entries left by an interrupted run."""
        journal.commit([(uid, where) for uid, where in journal.pending.items()
                        if (self.root / where).exists()])

    def store(self, uid: str, produce: Producer, journal: Journal) -> str:
        """Stream one message into tmp/; returns its future path relative to the Maildir."""
        now = time.time()
        base = f"{int(now)}.M{int(now % 1 * 1e6)}P{self._pid}Q{next(_COUNTER)}.{self._host}"
        tmp = f"{self._tmp_dir}/{base}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = _write_stream(fd, produce, LocalLines())
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        where = f"new/{base},S={size}"
        self._open.append(_Written(uid, fd, tmp, where))
        return where

    def seal(self, journal: Journal) -> list[str]:
        """Start fsyncing the open batch; finish the previous one (its UIDs are returned)."""
        done = self._finish(journal)
        if self._open:
            self._sealed, self._open = self._open, []
            self._syncs = [self._syncer.fsync(w.fd) for w in self._sealed]
        return done

    def flush(self, journal: Journal) -> list[str]:
        """Make everything written durable and journalled; returns the UIDs."""
        done = self.seal(journal)
        return done + self._finish(journal)

    def _finish(self, journal: Journal) -> list[str]:
        """Wait for the sealed batch's fsyncs, then B lines, renames, dir fsync, D lines."""
        if not self._sealed:
            return []
        try:
            for future in self._syncs:
                future.result()
        except BaseException:
            if not all(f.done() for f in self._syncs):
                raise  # interrupted while waiting: a later flush finishes the batch
            self._discard(self._sealed)
            raise
        batch = self._sealed
        items = [(w.uid, w.where) for w in batch]
        # The B lines precede the renames (a process kill keeps both in the page
        # cache); the D lines wait for the directory fsync.
        journal.begin_many(items)
        for w in batch:
            if w.fd >= 0:
                os.close(w.fd)
                w.fd = -1
            # Idempotent: an interrupted earlier attempt may have renamed it already.
            with contextlib.suppress(FileNotFoundError):
                os.rename(w.tmp, f"{self._root_dir}/{w.where}")
        fsync_dir(self.root / "new")
        journal.commit(items)
        self._sealed, self._syncs = [], []
        return [w.uid for w in batch]

    @staticmethod
    def _discard(batch: list[_Written]) -> None:
        for w in batch:
            if w.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(w.fd)
                w.fd = -1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(w.tmp)

    def close(self) -> None:
        """Drop what never became durable (it is fetched again next time); stop the threads."""
        self._syncer.close()
        self._discard(self._open + self._sealed)
        self._open, self._sealed, self._syncs = [], [], []


class MboxStore:
    """Append mboxrd-quoted messages to one mbox file under an exclusive lock."""

    kind = "mbox"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open: list[tuple[str, str]] = []
        self._sealed: list[tuple[str, str]] = []
        self._sync: Future[None] | None = None
        self._syncer = _Syncer()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise ConfigError(f"{path} is locked by another program") from exc
        self._size = os.fstat(self._fd).st_size  # we hold the lock: only we append

    @property
    def unsynced(self) -> int:
        """Messages appended but not yet durable."""
        return len(self._open) + len(self._sealed)

    def settle(self, journal: Journal) -> None:
        """Cut off a partial append left by an interrupted run."""
        if journal.pending:
            offset = min(int(where) for where in journal.pending.values())
            if os.fstat(self._fd).st_size > offset:
                os.ftruncate(self._fd, offset)
                os.fsync(self._fd)
                self._size = offset
            journal.pending.clear()

    def store(self, uid: str, produce: Producer, journal: Journal) -> str:
        """Append one message; on any failure the file is cut back."""
        offset = self._size
        # Only the first append of a batch needs a B line, made durable before
        # the mbox changes: recovery truncates back to the earliest pending offset.
        first = not self._open
        if first:
            journal.begin(uid, str(offset), sync=True)
        try:
            stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
            self._size += _write_stream(self._fd, produce, LocalLines(mboxrd=True),
                                        prefix=f"From MAILER-DAEMON {stamp}\n".encode(),
                                        suffix=b"\n")
        except BaseException:
            os.ftruncate(self._fd, offset)
            self._size = offset
            if first:
                journal.pending.pop(uid, None)
            raise
        self._open.append((uid, str(offset)))
        return str(offset)

    def seal(self, journal: Journal) -> list[str]:
        """Start an fsync covering the open batch; finish the previous one (UIDs returned)."""
        done = self._finish(journal)
        if self._open:
            self._sealed, self._open = self._open, []
            self._sync = self._syncer.fsync(self._fd)
        return done

    def flush(self, journal: Journal) -> list[str]:
        """fsync the mbox, then journal everything appended; returns the UIDs."""
        done = self.seal(journal)
        return done + self._finish(journal)

    def _finish(self, journal: Journal) -> list[str]:
        if not self._sealed:
            return []
        if self._sync is not None:
            self._sync.result()
        batch, self._sealed, self._sync = self._sealed, [], None
        journal.commit(batch)
        return [uid for uid, _ in batch]

    def close(self) -> None:
        """Stop the threads, unlock and close."""
        self._syncer.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)


#: Converted bytes collected before one write() (small messages: one write each).
WRITE_BUFFER = 256 * 1024


def _write_stream(fd: int, produce: Producer, lines: LocalLines, *, prefix: bytes = b"",
                  suffix: bytes = b"") -> int:
    """Run ``produce`` with a sink that converts and writes; return bytes written."""
    written = 0
    pending = bytearray(prefix)

    def sink(chunk: bytes) -> None:
        nonlocal written
        pending.extend(lines.feed(chunk))
        if len(pending) >= WRITE_BUFFER:
            written += _write_all(fd, pending)
            pending.clear()

    produce(sink)
    pending.extend(lines.finish())
    pending.extend(suffix)
    if pending:
        written += _write_all(fd, pending)
    return written


def _write_all(fd: int, data: bytes | bytearray) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)

"""Where ``fetch`` puts mail: a Maildir or an mbox, written crash-safely.

``mailbox.Maildir.add`` and ``mailbox.mbox.add`` take a whole message in
memory and never fsync; ``fetch`` may delete the server's copy, so it needs
a local write that is on disk before DELE.  Both stores here take a
*producer* (a function that streams the message into a sink), so RETR goes
straight from the socket to the file.

Exactly-once delivery across a crash uses a small journal (the UIDL state
file): ``B uid where`` is written *before* the store changes, ``D uid where``
once the message is durable.  Durability is batched: each Maildir file is
fsynced before its rename (the Maildir protocol), but the directory fsync and
the D lines happen once per batch in ``flush`` -- always before QUIT, which
is when the server applies DELE, so no deletion ever precedes durability.  On the next run a ``B``
without ``D`` is settled: for Maildir, the message counts as stored iff the
final file exists (rename is atomic); for mbox, the file is truncated back
to the recorded offset, removing a partial append.  Nothing is lost (the
server still has the message: it is only deleted after ``D``) and nothing
is duplicated.
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
from pathlib import Path

from mailbag.errors import ConfigError

Producer = Callable[[Callable[[bytes], object]], int]
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
#: A line start that may still turn into ">*From " once more bytes arrive.
_FROM_PREFIX = re.compile(rb">*(F(r(o(m)?)?)?)?")
_COUNTER = itertools.count(1)
#: Partial line held back by LocalLines before it is passed on in pieces.
MAX_PARTIAL = 64 * 1024


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
        if self._mboxrd:
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


class MaildirStore:
    """Deliver into ``new/`` by the Maildir protocol: write tmp/, fsync, rename."""

    kind = "maildir"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.unsynced: list[tuple[str, str]] = []
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def settle(self, journal: Journal) -> None:
        """Resolve journal entries left by an interrupted run."""
        journal.commit([(uid, where) for uid, where in journal.pending.items()
                        if (self.root / where).exists()])

    def store(self, uid: str, produce: Producer, journal: Journal) -> str:
        """Stream one message in; returns its path relative to the Maildir."""
        now = time.time()
        base = (f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_COUNTER)}"
                f".{_host_part()}")
        tmp = self.root / "tmp" / base
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = _write_stream(fd, produce, LocalLines())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        where = f"new/{base},S={size}"
        # The B line precedes the rename (a process kill keeps both in the page
        # cache); the D line waits for flush(), after the directory fsync.
        journal.begin(uid, where, sync=False)
        os.rename(tmp, self.root / where)
        self.unsynced.append((uid, where))
        return where

    def flush(self, journal: Journal) -> None:
        """Make the renames durable, then journal them: two fsyncs per batch."""
        if self.unsynced:
            fsync_dir(self.root / "new")
            journal.commit(self.unsynced)
            self.unsynced = []


class MboxStore:
    """Append mboxrd-quoted messages to one mbox file under an exclusive lock."""

    kind = "mbox"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unsynced: list[tuple[str, str]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise ConfigError(f"{path} is locked by another program") from exc

    def settle(self, journal: Journal) -> None:
        """Cut off a partial append left by an interrupted run."""
        if journal.pending:
            offset = min(int(where) for where in journal.pending.values())
            if os.fstat(self._fd).st_size > offset:
                os.ftruncate(self._fd, offset)
                os.fsync(self._fd)
            journal.pending.clear()

    def store(self, uid: str, produce: Producer, journal: Journal) -> str:
        """Append one message; on any failure the file is cut back."""
        offset = os.fstat(self._fd).st_size
        # Only the first append of a batch needs a durable B line: recovery
        # truncates back to the earliest pending offset.
        journal.begin(uid, str(offset), sync=not self.unsynced)
        try:
            stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
            os.write(self._fd, f"From MAILER-DAEMON {stamp}\n".encode())
            _write_stream(self._fd, produce, LocalLines(mboxrd=True))
            os.write(self._fd, b"\n")
        except BaseException:
            os.ftruncate(self._fd, offset)
            journal.pending.pop(uid, None)
            raise
        self.unsynced.append((uid, str(offset)))
        return str(offset)

    def flush(self, journal: Journal) -> None:
        """fsync the mbox, then journal the batch."""
        if self.unsynced:
            os.fsync(self._fd)
            journal.commit(self.unsynced)
            self.unsynced = []

    def close(self) -> None:
        """Unlock and close."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _write_stream(fd: int, produce: Producer, lines: LocalLines) -> int:
    """Run ``produce`` with a sink that converts and writes; return bytes written."""
    written = 0

    def sink(chunk: bytes) -> None:
        nonlocal written
        out = lines.feed(chunk)
        if out:
            written += _write_all(fd, out)

    produce(sink)
    tail = lines.finish()
    if tail:
        written += _write_all(fd, tail)
    return written


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)

"""``fetch``: copy new server messages into a local Maildir or mbox, once each.

This is fetchmail's ``--uidl --keep`` (or getmail's ``read_all = false``):
the UIDL of every message safely stored is kept in a journal next to the
destination, so each run downloads only what is new, and "leave on server"
is the default.  ``--delete`` sends DELE for a message only after its local
copy is fsynced and journalled, and the deletion itself happens at QUIT
(RFC 1939 UPDATE state) -- an interrupted run leaves the server untouched
and the next run resumes (see :mod:`mailbag.client.localstore`).

Speed on many small messages comes from RFC 2449 PIPELINING: when the
server announces it, up to :data:`PIPELINE_WINDOW` commands (RETR, and DELE
for batches already durable) are in flight, sent in groups with one write,
so the run is no longer one network round trip per message.  The store
fsyncs batch N in background threads while batch N+1 streams in.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mailbag.client.localstore import Journal, MaildirStore, MboxStore
from mailbag.client.pop3 import POP3Client
from mailbag.errors import ConfigError


class Store(Protocol):
    """What fetch needs from a destination (Maildir or mbox)."""

    kind: str

    def settle(self, journal: Journal) -> None: ...

    def store(self, uid: str, produce: _Producer, journal: Journal) -> str: ...

    def seal(self, journal: Journal) -> list[str]: ...

    def flush(self, journal: Journal) -> list[str]: ...

    def close(self) -> None: ...


class _Producer(Protocol):
    def __call__(self, sink: _Sink, /) -> int: ...


class _Sink(Protocol):
    def __call__(self, chunk: bytes, /) -> object: ...


#: Messages per durability batch (one directory/mbox fsync + one journal fsync).
FLUSH_EVERY = 100
#: Commands in flight when the server announces PIPELINING (a few hundred
#: bytes of commands: far below any socket buffer, so no write can block
#: while the server waits for us to read).
PIPELINE_WINDOW = 32


@contextlib.contextmanager
def _flushing(store: Store, journal: Journal) -> Iterator[None]:
    """Flush on the way out, also after Ctrl-C: completed messages stay counted."""
    try:
        yield
    finally:
        store.flush(journal)


@dataclass(slots=True)
class FetchSummary:
    """What one run did, for the closing line and for tests."""

    fetched: int = 0
    octets: int = 0
    skipped: int = 0
    deleted: int = 0
    seconds: float = 0.0
    locations: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One human sentence."""
        rate = self.fetched / self.seconds if self.seconds > 0 else 0.0
        return (f"fetched {self.fetched} message{'s' if self.fetched != 1 else ''} "
                f"({self.octets:,} octets) in {self.seconds:.2f} s ({rate:.0f} msg/s); "
                f"{self.skipped} already here; {self.deleted} deleted on the server")


def open_store(dest: str, fmt: str) -> Store:
    """``--format auto`` means: an existing directory or a path ending in / is a Maildir."""
    path = Path(dest).expanduser()
    if fmt == "auto":
        fmt = "maildir" if path.is_dir() or dest.endswith("/") else "mbox"
    if fmt == "maildir":
        return MaildirStore(path)
    if fmt == "mbox":
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; use --format maildir")
        return MboxStore(path)
    raise ConfigError(f"unknown format {fmt!r}")


def default_state_path(store: Store, account_label: str) -> Path:
    """Journal beside the mail it describes: deleting the mail forgets the state too."""
    safe = re.sub(r"[^A-Za-z0-9@._-]", "_", account_label)
    if isinstance(store, MaildirStore):
        return store.root / f".mailbag-uidl.{safe}"
    assert isinstance(store, MboxStore)
    return store.path.with_name(f".{store.path.name}.mailbag-uidl.{safe}")


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(bar_width=None),
        TextColumn("{task.fields[msgs]}"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def fetch(
    client: POP3Client,
    store: Store,
    journal: Journal,
    *,
    delete: bool = False,
    limit: int | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> FetchSummary:
    """Download every message whose UIDL is not in ``journal``; QUIT at the end."""
    started = time.monotonic()
    summary = FetchSummary()
    sizes = dict(client.list())
    uids = client.uidl()
    if uids is None and not delete:
        raise ConfigError("the server has no UIDL, so messages cannot be tracked: "
                          "use --delete to fetch and remove them")
    store.settle(journal)
    todo = [msn for msn in sorted(sizes) if uids is None or uids.get(msn) not in journal.done]
    summary.skipped = len(sizes) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    msn_of = {uid: msn for msn, uid in (uids or {}).items()}
    retrs = deque(todo)
    # Messages stored by an earlier run (kept then) are safe to remove now.
    deletes: deque[int] = deque(
        msn for msn, uid in (uids or {}).items() if delete and uid in journal.done)
    window = PIPELINE_WINDOW if client.pipelining else 1

    def top_up() -> None:
        """Send more commands once half the window is free (one write per group)."""
        room = window - len(client.inflight)
        if client.inflight and room < window // 2:
            return
        commands = []
        for _ in range(room):
            if deletes:
                commands.append(f"DELE {deletes.popleft()}")
            elif retrs:
                commands.append(f"RETR {retrs.popleft()}")
        client.send_pipelined(commands)

    def durable(done: list[str]) -> None:
        if delete:
            deletes.extend(msn_of[uid] for uid in done)

    console = console or Console(stderr=True)
    with _progress(console, progress) as bar, _flushing(store, journal):
        task = bar.add_task("fetch", total=sum(sizes[m] for m in todo),
                            msgs=f"0/{len(todo)} msgs")

        def counted(sink: _Sink) -> _Sink:
            if not progress:
                return sink

            def advance(chunk: bytes) -> None:
                sink(chunk)
                bar.advance(task, len(chunk))

            return advance

        def produce(sink: _Sink) -> int:
            return client.next_reply(counted(sink))[1] or 0

        while True:
            top_up()
            while client.inflight:
                verb, _, arg = client.inflight[0].partition(" ")
                msn = int(arg)
                if verb == "DELE":
                    client.next_reply()
                    summary.deleted += 1
                else:
                    uid = uids[msn] if uids is not None else f"nouidl-{time.time_ns()}-{msn}"
                    msn_of[uid] = msn
                    summary.locations.append(store.store(uid, produce, journal))
                    summary.fetched += 1
                    summary.octets += sizes[msn]
                    if progress:
                        bar.update(task, msgs=f"{summary.fetched}/{len(todo)} msgs")
                    if summary.fetched % FLUSH_EVERY == 0:
                        durable(store.seal(journal))
                top_up()
            durable(store.flush(journal))  # the rest, before any of its DELEs
            if not deletes:
                break
    client.quit()
    if uids is not None and limit is None:
        journal.compact(set(uids.values()))
    summary.seconds = time.monotonic() - started
    return summary

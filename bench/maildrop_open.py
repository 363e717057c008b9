"""How long does opening a big Maildir take?  (``python bench/maildrop_open.py``)

Creates ``--count`` messages (default 100,000) in a temporary Maildir, the
way a mix of delivery agents would leave them:

* half Dovecot/mailbag style in ``cur/`` (``...,S=123,W=130:2,S``), whose
  wire size is in the name;
* a quarter Postfix ``local`` style in ``new/`` (``1700000000.V801I1234M5678.host``),
* a quarter procmail style in ``cur/`` with empty flags (``:2,``),

the last two without sizes, so a cold open must read them.  Then it times:

cold
    no index: list, read every unsized file once, write the index;
warm (listing)
    index present but ``cur/`` recently changed: list both directories and
    match names against the index, read nothing;
warm (quiet dirs)
    index present and ``new/``/``cur/`` unchanged since it was written: two
    ``stat`` calls and the index, no listing.

Files are written straight to disk (not through ``deliver``, which fsyncs
twice per message) so setting up 100,000 messages takes seconds.  The page
cache is warm for all runs; a truly cold disk makes the *cold* case slower
(one random read per unsized message) but barely affects the warm cases.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mailbag.storage.maildir import INDEX_FILE, MaildirStore

USER = "bench"
OLD_NS = 1_000_000_000 * 1_000_000_000

LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
HEADER = (
    b"Return-Path: <sender@example.org>\n"
    b"Received: from mx.example.org by mail.example.com with LMTP\n"
    b"From: Sender <sender@example.org>\nTo: bench@example.com\n"
)


def make_maildir(maildir: Path, count: int) -> None:
    """Write ``count`` messages with realistic names; about 1-5 KB each."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, mode=0o700)
    base = 1_700_000_000
    for i in range(count):
        body = LINE * (10 + i % 60)
        data = HEADER + f"Subject: message {i}\nMessage-ID: <{i}@example.org>\n\n".encode() + body
        stamp = base + i * 7
        kind = i % 4
        if kind < 2:
            wire = len(data) + data.count(b"\n")  # no CR in these messages
            name = f"{stamp}.M{i % 999983}P{4000 + i % 300}.mail,S={len(data)},W={wire}"
            path = maildir / "cur" / f"{name}:2,S"
        elif kind == 2:
            path = maildir / "new" / f"{stamp}.V801I{i:x}M{i * 31 % 999983}.mail"
        else:
            path = maildir / "cur" / f"{stamp}.{4000 + i % 300}_{i}.mail:2,"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)


async def open_close(store: MaildirStore) -> tuple[float, int]:
    started = time.perf_counter()
    md = await store.open_maildrop(USER)
    elapsed = time.perf_counter() - started
    n = len(md.messages)
    await md.close()
    return elapsed, n


def report(label: str, times: list[float], n: int) -> None:
    print(
        f"{label:<18} messages={n:>7}  median={statistics.median(times) * 1000:8.1f} ms"
        f"  min={min(times) * 1000:8.1f} ms  max={max(times) * 1000:8.1f} ms  runs={len(times)}"
    )


async def bench(root: Path, count: int, runs: int) -> None:
    store = MaildirStore(str(root / "{user}"))
    maildir = root / USER
    index = maildir / INDEX_FILE

    cold: list[float] = []
    for _ in range(runs):
        index.unlink(missing_ok=True)
        elapsed, n = await open_close(store)
        cold.append(elapsed)
    report("cold (no index)", cold, n)
    assert n == count, (n, count)

    listing: list[float] = []
    for _ in range(runs):
        os.utime(maildir / "cur")  # "just changed": the mtime shortcut must not apply
        elapsed, n = await open_close(store)
        listing.append(elapsed)
    report("warm (listing)", listing, n)

    for sub in ("new", "cur"):
        os.utime(maildir / sub, ns=(OLD_NS, OLD_NS))
    await open_close(store)  # records mtimes that are provably quiet
    quiet: list[float] = []
    for _ in range(runs):
        elapsed, n = await open_close(store)
        quiet.append(elapsed)
    report("warm (quiet dirs)", quiet, n)
    print(f"index size: {index.stat().st_size / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=100_000, help="messages (default 100000)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--dir", help="where to build the Maildir (default: a temp dir)")
    args = parser.parse_args(argv)

    root = Path(args.dir or tempfile.mkdtemp(prefix="mailbag-bench-"))
    try:
        started = time.perf_counter()
        make_maildir(root / USER, args.count)
        print(f"created {args.count} messages in {time.perf_counter() - started:.1f} s at {root}")
        asyncio.run(bench(root, args.count, args.runs))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

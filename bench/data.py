"""The shared Maildir data both servers serve during the benchmark.

Messages are stored with bare LF line endings (as most delivery agents write
them), so both servers convert to CRLF on the way out; some body lines start
with ``.`` so dot-stuffing is exercised too.  The expected wire form of every
RETR message is computed here independently of mailbag's code (LF -> CRLF),
and the load generator checks each received body against it.

A stamp file records what was generated, so a second run on the same
``--workdir`` reuses the data (setting up 100,000 messages takes a while).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "bench-password"
DATA_VERSION = 3

LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n"
DOTS = b".a line that starts with a dot, so it is dot-stuffed on the wire\n"


@dataclass(frozen=True)
class Layout:
    """User names and counts; the same for both servers."""

    session_users: int = 51  # c=50 workers plus one spare
    hold_users: int = 10_000
    trickle_users: int = 50
    small_messages: int = 10
    retr_small: int = 300  # ~10 KB each
    retr_large: int = 48  # ~1 MiB each
    big_messages: int = 100_000


#: Concurrent RETR figures (``10KB-c8``, ``1MiB-c8``, ``mix-c8``): one account per load
#: worker, because both servers (mailbag always, Dovecot with ``pop3_lock_session``)
#: lock a maildrop per session.
RETR_CONCURRENCY = 8
#: The account sets of the concurrent figures: ``<prefix>0`` .. ``<prefix>7``.
CONCURRENT_SETS = ("retrsmall", "retrlarge", "retrmix")
CONCURRENT_VERSION = 1


def mix_sizes() -> list[int]:
    """The size mix of ``mix-c8``: 100 messages, deterministic, in shuffled order.

    Roughly what a POP3 maildrop holds: 80 plain-text mails of 2-20 KB
    (log-uniform, so most are small), 15 with a small attachment of 50-200 KB
    and 5 with a large one of about 1 MiB (0.9-1.1 MiB).  About 7.5 MB per
    pass: the small ones dominate the message count, the large ones the bytes.
    """
    rng = random.Random(1939)

    def log_uniform(lo: float, hi: float) -> int:
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    sizes = [log_uniform(2_000, 20_000) for _ in range(80)]
    sizes += [log_uniform(50_000, 200_000) for _ in range(15)]
    sizes += [rng.randint(943_718, 1_153_433) for _ in range(5)]
    rng.shuffle(sizes)
    return sizes
def message(number: int, size: int, user: str) -> bytes:
    """A plausible message of about ``size`` octets, LF line endings."""
    header = (
        f"Return-Path: <sender@example.org>\n"
        f"From: Sender <sender@example.org>\nTo: {user}@example.com\n"
        f"Subject: benchmark message {number}\n"
        f"Message-ID: <{number}.{user}@example.org>\n\n"
    ).encode()
    body = bytearray()
    while len(header) + len(body) < size:
        body += DOTS if len(body) % 1000 < len(LINE) else LINE
    return header + bytes(body)


def wire_digest(data: bytes) -> str:
    """SHA-256 of the RFC 1939 wire form of an LF-only message ending in LF."""
    return hashlib.sha256(data.replace(b"\n", b"\r\n")).hexdigest()


def _maildir(root: Path, user: str) -> Path:
    path = root / user
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def _put(path: Path, name: str, data: bytes, *, cur: bool = False) -> None:
    target = path / ("cur" if cur else "new") / (name + (":2," if cur else ""))
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def write_box(root: Path, user: str, sizes: list[int]) -> list[str]:
    """A Maildir with one message per size; returns the wire digests."""
    path = _maildir(root, user)
    digests = []
    for i, size in enumerate(sizes):
        data = message(i, size, user)
        _put(path, f"{1_700_000_000 + i}.M{i}P1.bench", data)
        digests.append(wire_digest(data))
    return digests


def write_big_box(root: Path, user: str, count: int) -> None:
    """``count`` 1-5 KB messages named like a mix of delivery agents would name them.

    Half carry Dovecot's ``,S=``/``,W=`` sizes in ``cur/``; a quarter are
    Postfix-style names in ``new/``; a quarter procmail-style in ``cur/``:
    a cold open must read the unsized half, on both servers.
    """
    path = _maildir(root, user)
    for i in range(count):
        data = message(i, 1000 + (i * 37) % 4000, user)
        stamp = 1_700_000_000 + i * 7
        kind = i % 4
        if kind < 2:
            wire = len(data) + data.count(b"\n")
            _put(path, f"{stamp}.M{i}P{4000 + i % 300}.bench,S={len(data)},W={wire}", data,
                 cur=True)
        elif kind == 2:
            _put(path, f"{stamp}.V801I{i:x}M{i * 31 % 999983}.bench", data)
        else:
            _put(path, f"{stamp}.{4000 + i % 300}_{i}.bench", data, cur=True)


def build(workdir: Path, layout: Layout, users_lines: list[str], owner: tuple[int, int],
          log: object = print) -> dict[str, Path]:
    """Create (or reuse) all Maildirs and the users file; return useful paths."""
    mail = workdir / "mail"
    stamp = workdir / "data.json"
    want = {"version": DATA_VERSION, "layout": layout.__dict__}
    users = workdir / "users"
    paths = {"mail": mail, "users": users, "expect_small": workdir / "expect-small.json",
             "expect_large": workdir / "expect-large.json",
             **{f"expect_{prefix}_c": workdir / f"expect-{prefix}-c.json"
                for prefix in CONCURRENT_SETS}}
    users.write_text("".join(line + "\n" for line in users_lines))
    os.chown(users, 0 if os.geteuid() == 0 else owner[0], owner[1])
    users.chmod(0o640)
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        log("reusing Maildir data in", mail)
        # Files an earlier run's server made must belong to the Maildirs' owner too.
        build_concurrent(workdir, layout, paths, log)
        subprocess.run(["chown", "-R", f"{owner[0]}:{owner[1]}", str(mail)], check=True)
        return paths
    if mail.exists():
        shutil.rmtree(mail)
    mail.mkdir(parents=True)
    workdir.chmod(0o755)
    log("creating Maildir data in", mail, "(once; reused by later runs)")
    for i in range(layout.session_users):
        for scheme in ("plain", "argon"):
            write_box(mail, f"s{scheme}{i}", [1500 + 300 * k for k in range(layout.small_messages)])
    for i in range(layout.hold_users):
        write_box(mail, f"hold{i}", [1200, 2400])
    for i in range(layout.trickle_users):
        write_box(mail, f"trickle{i}", [1200 + 300 * k for k in range(layout.small_messages)])
    small = write_box(mail, "retrsmall", [10_000 + 17 * k for k in range(layout.retr_small)])
    large = write_box(mail, "retrlarge", [1_048_576 + 311 * k for k in range(layout.retr_large)])
    paths["expect_small"].write_text(json.dumps(small))
    paths["expect_large"].write_text(json.dumps(large))
    write_big_box(mail, "big", layout.big_messages)
    build_concurrent(workdir, layout, paths, log)
    subprocess.run(["chown", "-R", f"{owner[0]}:{owner[1]}", str(mail)], check=True)
    stamp.write_text(json.dumps(want))
    return paths


def build_concurrent(workdir: Path, layout: Layout, paths: dict[str, Path],
                     log: Callable[..., None] = print) -> None:
    """The accounts of the concurrent RETR figures (created once, beside the rest).

    It has its own stamp, so a data directory made before these figures
    existed gains them in seconds instead of being rebuilt.  Account
    ``<prefix>0`` gets freshly written files (the same sizes as ``retrsmall``
    and ``retrlarge``, and the mix); ``<prefix>1..7`` are hard links to them:
    the same bytes and digests, no extra disk or page cache, and each
    account is still its own Maildir (each server renames or indexes per
    account, never changing a file's content).  The digests of the set
    (``expect-<prefix>-c.json``) differ from ``retrsmall``'s because a
    message names its account in its headers.
    """
    mail = paths["mail"]
    stamp = workdir / "data-concurrent.json"
    want = {"version": CONCURRENT_VERSION, "concurrency": RETR_CONCURRENCY,
            "small": layout.retr_small, "large": layout.retr_large, "mix": mix_sizes()}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    log("creating the concurrent RETR accounts (once)")
    sizes = {"retrsmall": [10_000 + 17 * k for k in range(layout.retr_small)],
             "retrlarge": [1_048_576 + 311 * k for k in range(layout.retr_large)],
             "retrmix": mix_sizes()}
    for prefix in CONCURRENT_SETS:
        for i in range(RETR_CONCURRENCY):
            if (mail / f"{prefix}{i}").exists():
                shutil.rmtree(mail / f"{prefix}{i}")
        first = f"{prefix}0"
        digests = write_box(mail, first, sizes[prefix])
        paths[f"expect_{prefix}_c"].write_text(json.dumps(digests))
        for i in range(1, RETR_CONCURRENCY):
            box = _maildir(mail, f"{prefix}{i}")
            for entry in os.scandir(mail / first / "new"):
                os.link(entry.path, box / "new" / entry.name)
    stamp.write_text(json.dumps(want))


def users_file_lines(layout: Layout, argon2: str) -> list[str]:
    """passwd-file entries: PLAIN for most users, one shared ARGON2ID hash for the argon users."""
    lines = [f"splain{i}:{{PLAIN}}{PASSWORD}" for i in range(layout.session_users)]
    lines += [f"sargon{i}:{argon2}" for i in range(layout.session_users)]
    lines += [f"hold{i}:{{PLAIN}}{PASSWORD}" for i in range(layout.hold_users)]
    lines += [f"trickle{i}:{{PLAIN}}{PASSWORD}" for i in range(layout.trickle_users)]
    lines += [f"{name}:{{PLAIN}}{PASSWORD}" for name in ("retrsmall", "retrlarge", "big")]
    lines += [f"{prefix}{i}:{{PLAIN}}{PASSWORD}" for prefix in CONCURRENT_SETS
              for i in range(RETR_CONCURRENCY)]
    return lines

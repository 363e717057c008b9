"""Maildir file names: unique names, size fields, UIDLs and new names.

A Maildir message file is named ``UNIQUE[:2,FLAGS]``.  The part before the
colon (``mailbox.Maildir`` calls it the *key*) is chosen once by the delivery
agent and never changes afterwards: a mail reader that sets flags or moves the
file from ``new/`` to ``cur/`` keeps it.  Everything stable about a message,
its UIDL above all, is therefore derived from the key and never from the
flags (the Twisted mistake DESIGN.md warns about).

Dovecot extends the key with ``,S=<octets>`` (stored size) and
``,W=<octets>`` (size with CRLF line endings, which is exactly our wire
size); we read both when present and write both on delivery, so that a
maildrop written by us can be opened by Dovecot without reading every file
and vice versa.

Nothing here touches the filesystem except ``NameGenerator`` asking for the
time, the pid and random bytes; this keeps the rules testable on strings.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import socket
import sys
import threading
import time

from mailbag.errors import InvalidUsername

#: Our bookkeeping files in the Maildir root (see ``maildir`` for what each is).
LOCK_FILE = "mailbag.lock"
INDEX_FILE = "mailbag.index"
UIDL_OVERRIDE_FILE = "mailbag-uidl"

#: Separates the unique name from the info (``2,FLAGS``) part (Maildir spec).
INFO_SEP = ":"

#: Length of a derived UIDL: 24 base32 characters = 120 bits of SHA-256.
#: Compact, only ``[a-z2-7]`` (no dots, which some Outlook versions mishandle)
#: and far below the 70-character limit of RFC 1939 section 7.
UIDL_LENGTH = 24

_UIDL_RE = re.compile(r"[\x21-\x7e]{1,70}\Z")
_LEADING_TIME_RE = re.compile(r"(\d+)(?:\.M(\d+)P\d+(?:Q(\d+))?)?")
#: Microseconds in the second part of a name: ``M123456`` (mailbag, Dovecot, Postfix).
_USEC_RE = re.compile(r"\.(?:[^.]*?)M(\d{1,6})(?!\d)")
_W_FIELD_RE = re.compile(r",W=(\d+)")


def unique_name(filename: str) -> str:
    """Return the key of a Maildir file name: everything before the first ``:``."""
    sep = filename.find(INFO_SEP)
    return filename if sep < 0 else filename[:sep]


_B32 = "abcdefghijklmnopqrstuvwxyz234567"
#: Two base32 digits per 10 bits: a table lookup instead of Python 3.11's
#: pure-Python ``base64.b32encode``, which dominated a cold open.
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)
_MASK = 1023
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def derive_uidl(key: str) -> str:
    """Derive the UIDL of the message whose unique name is ``key``.

    A hash (rather than the name itself) because names can be long, may
    contain bytes outside 0x21-0x7E (non-ASCII hostnames, escaped ``\\057``)
    and some contain dots.  Encoding like ``os.fsencode`` gives back the
    exact on-disk bytes, so undecodable names hash consistently too.  The
    result equals ``base32(sha256(name))[:24].lower()``.
    """
    digest = hashlib.sha256(key.encode(_FS_ENCODING, _FS_ERRORS)).digest()
    n = int.from_bytes(digest[:15], "big")  # UIDL_LENGTH * 5 bits
    p, m = _B32_PAIRS, _MASK
    # Unrolled (12 pairs of base32 digits): a cold open derives one per message.
    return "".join((
        p[n >> 110], p[(n >> 100) & m], p[(n >> 90) & m], p[(n >> 80) & m],
        p[(n >> 70) & m], p[(n >> 60) & m], p[(n >> 50) & m], p[(n >> 40) & m],
        p[(n >> 30) & m], p[(n >> 20) & m], p[(n >> 10) & m], p[n & m],
    ))  # fmt: skip


def is_valid_uidl(uidl: str) -> bool:
    """True for 1-70 characters in 0x21-0x7E (RFC 1939 section 7)."""
    return _UIDL_RE.match(uidl) is not None


def wire_size_from_name(key: str) -> int | None:
    """Return the ``,W=`` value of a unique name, or None when it has none.

    Only fields after the first comma count, so a bare number in the
    hostname part can never be mistaken for a size.
    """
    comma = key.find(",")
    if comma < 0:
        return None
    # One search for the first ``,W=<digits>``: a ``,S=`` field before it
    # cannot overlap it (a field ends in digits, the next starts with a comma).
    match = _W_FIELD_RE.search(key, comma)
    return int(match.group(1)) if match is not None else None


def arrival_key(key: str) -> tuple[int, int, int, str]:
    """Sort key for names the index has not seen yet: delivery time, then name.

    Every common delivery agent starts the name with the delivery time in
    seconds (``1234567890.V801I1234M5678.host``, ``1234567890.M123P45...``).
    The modern ``sec.M{usec}P{pid}[Q{n}]`` form also carries microseconds
    and a per-process counter, unpadded, so they are compared as numbers
    (``M99`` before ``M100``).  Names without a time sort first, by name,
    which is at least deterministic.
    """
    match = _LEADING_TIME_RE.match(key)
    if match is None:
        return (0, 0, 0, key)
    sec, usec, counter = match.groups()
    return (int(sec), int(usec or 0), int(counter or 0), key)


#: Packing (sec, usec, counter) into one int needs bounded parts; see ``arrival_order``.
_USEC_LIMIT = 10**6
_COUNTER_LIMIT = 10**9


def arrival_order(keys: list[str]) -> list[str]:
    """``keys`` sorted by ``arrival_key``, several times faster for large lists.

    A cold open sorts every name of the maildrop, and comparing 100,000
    tuples cost more than computing them.  Sorting by name first and then,
    stably, by one int that packs (seconds, microseconds, counter) gives the
    same order with C-speed int comparisons.  Names whose parts do not fit
    the packing (absurd microsecond or counter fields) take the tuple path.
    """
    if len(keys) < 64:
        return sorted(keys, key=arrival_key)
    ordered = sorted(keys)
    packed: list[int] = []
    match = _LEADING_TIME_RE.match
    for key in ordered:
        m = match(key)
        if m is None:
            packed.append(0)
            continue
        sec, usec, counter = m.groups()
        u = int(usec) if usec else 0
        c = int(counter) if counter else 0
        if u >= _USEC_LIMIT or c >= _COUNTER_LIMIT:
            return sorted(keys, key=arrival_key)
        packed.append((int(sec) * _USEC_LIMIT + u) * _COUNTER_LIMIT + c)
    order = sorted(range(len(ordered)), key=packed.__getitem__)
    return [ordered[i] for i in order]


def split_user(user: str) -> tuple[str, str]:
    """Split ``local@domain`` (at the last ``@``); ``(user, "")`` without one.

    Refuses names that could never be a safe path component: empty, ``.``,
    ``..``, containing ``/``, NUL or control characters.  The auth layer
    validates names already; storage checks again because this is where a
    name becomes a path.
    """
    if not user or any(ord(c) < 0x20 or c in "/\x7f" for c in user):
        raise InvalidUsername(f"user name not usable as a path: {user!r}")
    local, at, domain = user.rpartition("@")
    if not at:
        local, domain = user, ""
    if not local or {user, local, domain} & {".", ".."}:
        raise InvalidUsername(f"user name not usable as a path: {user!r}")
    return local, domain


def sanitize_hostname(hostname: str) -> str:
    """Escape ``/`` and ``:`` as the Maildir spec says (``\\057``, ``\\072``).

    ``,`` is escaped too (``\\054``, as Dovecot does) so that a hostname can
    never be confused with a ``,S=``/``,W=`` size field.
    """
    return hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054") or "localhost"


class NameGenerator:
    """Makes unique names ``{sec}.M{usec}P{pid}Q{n}R{hex}.{host},S={len},W={wire}``.

    Uniqueness comes from several independent parts: time, pid, a per-process
    counter (two deliveries in the same microsecond) and 64 random bits (pid
    reuse across a reboot, several hosts sharing one NFS Maildir).  The
    counter is guarded by a lock because deliveries run in worker threads.
    """

    def __init__(self, hostname: str | None = None) -> None:
        self._host = sanitize_hostname(hostname if hostname is not None else socket.gethostname())
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def make(self, size: int, wire: int) -> str:
        """Return a fresh unique name for a message of ``size`` stored octets."""
        with self._lock:
            n = next(self._counter)
        now = time.time_ns()
        sec, usec = divmod(now // 1000, 1_000_000)
        rand = os.urandom(8).hex()
        return f"{sec}.M{usec}P{os.getpid()}Q{n}R{rand}.{self._host},S={size},W={wire}"

"""The per-maildrop cache index and the scan that keeps it honest.

Why an index at all: a POP3 session needs every message's wire size at
open (STAT, LIST).  Names with ``,W=`` carry it, but mail delivered by
Postfix ``local`` or procmail does not, and reading 100,000 files on every
login is not an option.  The index remembers, per message, the arrival
position, the unique name, where the file was last seen and its wire size.

The index is only a cache.  Everything in it can be recomputed from the
Maildir itself (UIDLs are derived from names, sizes from ``,W=`` or from
the bytes), so a missing, truncated or garbled index costs one slow open,
never a wrong UIDL.  Durable facts that cannot be recomputed (UIDLs
imported from another server) live elsewhere (``maildir.UIDL_OVERRIDE_FILE``).

File format (UTF-8 text with ``surrogateescape`` for odd file names), one
line per column, messages in arrival order::

    mailbag-index 2<TAB>new-mtime-ns<TAB>cur-mtime-ns<TAB>scan-start-ns<TAB>count
    uidl uidl uidl ...                 (SPACE-separated; UIDLs never contain one)
    base64 of the wire sizes as little-endian signed 64-bit integers
    ncnnc...                           (one character per message: new/ or cur/)
    file-name<TAB>file-name<TAB>...    (TAB, LF, CR and backslash escaped)
    end<TAB>count<TAB>crc32-of-everything-above

Columns rather than a line per message because an indexed open of 100,000
messages is dominated by parsing: each column is one C-speed split (the
sizes one ``array`` conversion), and the two location columns are split
only when a message is read or deleted (``Listing.unsplit``).  Version 1
files (a line per message) are still read.

The trailer detects truncation and accidental corruption; anything that
fails to parse is treated as "no index".  Writers replace the file
atomically (temporary file, fsync, rename), so a crash leaves either the
old index or the new one.

All functions here block; callers run them in a worker thread.
"""

from __future__ import annotations

import array
import binascii
import contextlib
import logging
import os
import re
import stat
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from mailbag.storage.maildir_names import (
    arrival_order,
    derive_uidl,
    unique_name,
    wire_size_from_name,
)
from mailbag.wireform import wire_size

log = logging.getLogger(__name__)

INDEX_MAGIC = "mailbag-index 2"
INDEX_MAGIC_V1 = "mailbag-index 1"

#: How long before the scan a directory must have last changed for its mtime
#: to prove "nothing changed since".  Covers coarse timestamps (FAT: 2 s,
#: ext4/xfs: one kernel tick) and small clock differences; on NFS with badly
#: skewed clocks, switch the shortcut off (``MaildirStore(trust_mtimes=False)``).
MTIME_MARGIN_NS = 2_000_000_000

#: Unknown names in one directory above which one ``scandir`` beats a ``stat`` per name.
SCANDIR_MIN = 64

#: Chunk size for reading a message to measure it.
SIZE_READ_CHUNK = 256 * 1024

SUBDIRS = ("new", "cur")
_SUBDIR_OF_CODE = {"n": "new", "c": "cur"}
_BIG_ENDIAN = sys.byteorder == "big"
_CODE_OF_SUBDIR = {"new": "n", "cur": "c"}

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}
_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")
_NEEDS_ESCAPE_NO_TAB = re.compile(r"[\\\n\r]")
_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)


class Entry(NamedTuple):
    """One message as the index knows it.  ``uid`` is the derived UIDL."""

    uid: str
    subdir: str
    filename: str
    size: int

    @property
    def key(self) -> str:
        """The unique name (file name without ``:2,FLAGS``)."""
        return unique_name(self.filename)


class Listing:
    """Messages in arrival order, stored as columns.

    Columns rather than one object per message because opening a maildrop
    of 100,000 messages must stay well under a second: parsing the index is
    then a handful of splits, and no per-message object is built until
    the session asks for one (``entry``).  Where each file lives
    (``subdirs``, ``filenames``) is only needed to read or delete a message
    or to reconcile with a directory listing, so an index read without
    listing keeps those two columns unsplit until first use.
    """

    __slots__ = ("_filenames", "_lazy", "_subdirs", "sizes", "uids")

    def __init__(
        self,
        uids: list[str] | None = None,
        subdirs: list[str] | None = None,
        filenames: list[str] | None = None,
        sizes: list[int] | None = None,
    ) -> None:
        self.uids: list[str] = uids if uids is not None else []
        self._subdirs: list[str] = subdirs if subdirs is not None else []
        self._filenames: list[str] = filenames if filenames is not None else []
        self.sizes: list[int] = sizes if sizes is not None else []
        self._lazy: tuple[str, str] | None = None  # (subdir codes, escaped names)

    @classmethod
    def unsplit(cls, uids: list[str], sizes: list[int], codes: str, names: str) -> Listing:
        """A listing whose locations stay as index text until first used.

        ``codes`` holds one character per message (``n`` new, ``c`` cur);
        ``names`` the escaped file names joined by TAB.
        """
        listing = cls(uids, None, None, sizes)
        listing._lazy = (codes, names)
        return listing

    def _split(self) -> None:
        assert self._lazy is not None
        codes, names = self._lazy
        self._lazy = None
        count = len(self.uids)
        filenames = names.split("\t") if count else []
        if "\\" in names:
            filenames = [_unescape(name) for name in filenames]
        subdirs = [_SUBDIR_OF_CODE[c] for c in codes]
        if len(filenames) != count or len(subdirs) != count:
            raise ValueError("index columns differ in length")
        self._subdirs, self._filenames = subdirs, filenames

    @property
    def subdirs(self) -> list[str]:
        """``new`` or ``cur`` per message."""
        if self._lazy is not None:
            self._split()
        return self._subdirs

    @property
    def filenames(self) -> list[str]:
        """The file name (with ``:2,FLAGS``) per message."""
        if self._lazy is not None:
            self._split()
        return self._filenames

    def __len__(self) -> int:
        return len(self.uids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Listing):
            return NotImplemented
        return (self.uids, self.subdirs, self.filenames, self.sizes) == (
            other.uids, other.subdirs, other.filenames, other.sizes)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Listing({len(self)} messages)"

    def entry(self, pos: int) -> Entry:
        """The message at ``pos`` (0-based arrival position)."""
        return Entry(self.uids[pos], self.subdirs[pos], self.filenames[pos], self.sizes[pos])

    def append(self, entry: Entry) -> None:
        """Add a message at the end."""
        self.uids.append(entry.uid)
        self.subdirs.append(entry.subdir)
        self.filenames.append(entry.filename)
        self.sizes.append(entry.size)

    def move(self, pos: int, subdir: str, filename: str) -> None:
        """Record that the file at ``pos`` now lives at ``subdir/filename``."""
        self.subdirs[pos] = subdir
        self.filenames[pos] = filename

    def without(self, positions: set[int]) -> Listing:
        """A copy without the messages at ``positions``."""
        keep = [i for i in range(len(self.uids)) if i not in positions]
        subdirs, filenames = self.subdirs, self.filenames
        return Listing(
            [self.uids[i] for i in keep],
            [subdirs[i] for i in keep],
            [filenames[i] for i in keep],
            [self.sizes[i] for i in keep],
        )

    @classmethod
    def of(cls, entries: list[Entry]) -> Listing:
        """Build a listing from entries (tests, small maildrops)."""
        listing = cls()
        for entry in entries:
            listing.append(entry)
        return listing


@dataclass(frozen=True, slots=True)
class IndexData:
    """A parsed index: its messages and the directory state it was taken from."""

    listing: Listing
    new_mtime_ns: int
    cur_mtime_ns: int
    scanned_ns: int
    outdated_format: bool = False  # read from a version 1 file: rewrite it

    def trustworthy(self, new_mtime_ns: int, cur_mtime_ns: int) -> bool:
        """True when the directories provably did not change since the scan.

        Any create, rename or unlink in ``new/`` or ``cur/`` updates that
        directory's mtime.  Equal mtimes prove nothing changed *provided*
        the last change happened well before the scan began; otherwise a
        change in the same timestamp tick as the scan would be invisible.
        """
        return (
            new_mtime_ns == self.new_mtime_ns
            and cur_mtime_ns == self.cur_mtime_ns
            and max(new_mtime_ns, cur_mtime_ns) + MTIME_MARGIN_NS < self.scanned_ns
        )


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What ``scan`` found, and whether the index file should be rewritten."""

    listing: Listing
    index: IndexData
    needs_write: bool
    listed: bool


def _escape(name: str) -> str:
    if _NEEDS_ESCAPE.search(name) is None:
        return name
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], name)


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(1)), field)


def read_index(path: str) -> IndexData | None:
    """Parse the index at ``path``; None if it is missing or invalid in any way."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read maildir index %s: %s", path, exc.strerror)
        return None
    try:
        return _parse_index(data)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        log.warning("ignoring invalid maildir index %s: %s", path, exc)
        return None


def _parse_index(data: bytes) -> IndexData:
    if not data.endswith(b"\n"):
        raise ValueError("truncated")
    trailer_start = data.rfind(b"\n", 0, len(data) - 1) + 1
    tag, count_s, crc_s = data[trailer_start:-1].decode("ascii").split("\t")
    if tag != "end" or int(crc_s, 16) != zlib.crc32(data[:trailer_start]):
        raise ValueError("bad trailer or checksum")
    text = data[:trailer_start].decode("utf-8", "surrogateescape")
    header_end = text.index("\n")
    header = text[:header_end].split("\t")
    if header[0] == INDEX_MAGIC:
        return _parse_columns(header, int(count_s), text[header_end + 1 : -1])
    magic, new_s, cur_s, scanned_s = header
    if magic != INDEX_MAGIC_V1:
        raise ValueError("bad header")
    # One flat split and column slices: ~10x faster than a loop over lines,
    # which matters at 100,000 messages.
    fields = (
        text[header_end + 1 : -1].replace("\n", "\t").split("\t") if text[header_end + 1 :] else []
    )
    count = int(count_s)
    if len(fields) != 4 * count:
        raise ValueError("bad field count")
    uids, subdirs, sizes, names = fields[0::4], fields[1::4], fields[2::4], fields[3::4]
    if not set(subdirs) <= set(SUBDIRS):
        raise ValueError("bad subdir")
    if "\\" in text:
        names = [_unescape(name) for name in names]
    listing = Listing(uids, subdirs, names, list(map(int, sizes)))
    return IndexData(listing, int(new_s), int(cur_s), int(scanned_s), outdated_format=True)


def _parse_columns(header: list[str], count: int, body: str) -> IndexData:
    """The version 2 body: five lines, one per column (see the module docstring).

    Everything that could make the lazy split of the location columns fail
    later is checked here, so a bad index is always "no index", never an
    error in the middle of a session.
    """
    _magic, new_s, cur_s, scanned_s, count_s = header
    uid_line, size_line, codes, names = body.split("\n")
    if int(count_s) != count:
        raise ValueError("bad count")
    uids = uid_line.split(" ") if count else []
    sizes = array.array("q", binascii.a2b_base64(size_line))
    if _BIG_ENDIAN:
        sizes.byteswap()
    if not (len(uids) == len(sizes) == len(codes) == count):
        raise ValueError("bad column length")
    if codes.strip("nc") or (count and names.count("\t") != count - 1) or (not count and names):
        raise ValueError("bad location column")
    listing = Listing.unsplit(uids, sizes.tolist(), codes, names)
    return IndexData(listing, int(new_s), int(cur_s), int(scanned_s))


def _join_names(names: list[str]) -> str:
    """The names column: escaped names joined by TAB (one C-speed join when none needs escaping)."""
    joined = "\t".join(names)
    if joined.count("\t") == max(len(names) - 1, 0) and not _NEEDS_ESCAPE_NO_TAB.search(joined):
        return joined
    return "\t".join(map(_escape, names))


def format_index(index: IndexData) -> bytes:
    """Serialise ``index`` (header, one line per column, checksummed trailer)."""
    m = index.listing
    sizes = array.array("q", m.sizes)
    if _BIG_ENDIAN:
        sizes.byteswap()
    lines = [
        f"{INDEX_MAGIC}\t{index.new_mtime_ns}\t{index.cur_mtime_ns}\t{index.scanned_ns}\t{len(m)}",
        " ".join(m.uids),
        binascii.b2a_base64(sizes.tobytes(), newline=False).decode("ascii"),
        "".join([_CODE_OF_SUBDIR[subdir] for subdir in m.subdirs]),
        _join_names(m.filenames),
        "",
    ]
    body = "\n".join(lines).encode("utf-8", "surrogateescape")
    return body + f"end\t{len(m)}\t{zlib.crc32(body):08x}\n".encode("ascii")


def write_index(path: str, index: IndexData, *, fsync: bool = True) -> None:
    """Atomically replace the index at ``path`` (tmp + fsync + rename).

    Raises OSError; callers decide whether a failed cache write matters
    (it never should fail a POP3 login).
    """
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(format_index(index))
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def measure(path: str, *, dir_fd: int | None = None) -> int:
    """Wire size of the file at ``path``, streamed in large chunks.

    A cold open of a big maildrop measures tens of thousands of small
    files, so the usual case (the whole file in the first read) is done
    inline: one read, the read that sees end-of-file, and a CRLF count only
    when the file has a CR at all.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        first = os.read(fd, SIZE_READ_CHUNK)
        if not first:
            return 0
        second = os.read(fd, SIZE_READ_CHUNK)
        if second:
            return wire_size(_chunks(fd, first, second))
    finally:
        os.close(fd)
    size = len(first) + first.count(b"\n")
    if b"\r" in first:
        size -= first.count(b"\r\n")
    return size if first.endswith(b"\n") else size + 2


def _chunks(fd: int, *read: bytes) -> Iterator[bytes]:
    yield from read
    while chunk := os.read(fd, SIZE_READ_CHUNK):
        yield chunk


def list_dir(maildir: str, subdir: str) -> list[str]:
    """All names in ``maildir/subdir`` (``os.listdir``: C speed, no per-name calls).

    Dotfiles and non-files are filtered later, and only for names the index
    does not know (``is_message``): names in the index were checked when
    they were first seen, so a big quiet maildrop pays nothing per name.
    """
    return os.listdir(os.path.join(maildir, subdir))


def is_message(maildir: str, subdir: str, name: str) -> bool:
    """True for a regular file whose name does not start with a dot.

    The Maildir spec reserves dotfiles (editors and tools leave them);
    directories are never messages.
    """
    if name.startswith("."):
        return False
    try:
        return stat.S_ISREG(os.stat(os.path.join(maildir, subdir, name)).st_mode)
    except FileNotFoundError:
        return False


def _messages_among(maildir: str, subdir: str, names: set[str]) -> list[str]:
    """The ``names`` in ``maildir/subdir`` for which ``is_message`` holds.

    Few names: one ``stat`` each.  Many (a cold open of a big maildrop):
    one ``scandir`` pass instead, whose file types come from the directory
    entries themselves, so 100,000 new names cost no ``stat`` calls.  Same
    answers: ``DirEntry.is_file()`` follows symlinks like ``os.stat``, and a
    name that vanished since the listing is not a message in either.
    """
    if len(names) < SCANDIR_MIN:
        return [name for name in names if is_message(maildir, subdir, name)]
    files: set[str] = set()
    try:
        with os.scandir(os.path.join(maildir, subdir)) as entries:
            for entry in entries:
                if entry.name in names and not entry.name.startswith("."):
                    with contextlib.suppress(OSError):
                        if entry.is_file():
                            files.add(entry.name)
    except FileNotFoundError:
        return []
    return [name for name in names if name in files]


def _message_files(maildir: str, subdir: str) -> list[str]:
    """Every name in ``maildir/subdir`` for which ``is_message`` holds, in one ``scandir``."""
    files = []
    with os.scandir(os.path.join(maildir, subdir)) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    if entry.is_file():
                        files.append(entry.name)
    return files


def locate(maildir: str, key: str) -> tuple[str, str] | None:
    """Find the current (subdir, file name) of the message with unique name ``key``.

    Used when a file vanished from where we last saw it: another program
    may have moved it from ``new/`` to ``cur/`` or changed its flags.
    ``new/`` is searched first because files only ever move new -> cur.
    """
    prefix = key + ":"
    for subdir in SUBDIRS:
        try:
            for name in list_dir(maildir, subdir):
                if (name == key or name.startswith(prefix)) and is_message(maildir, subdir, name):
                    return subdir, name
        except FileNotFoundError:
            continue
    return None


def scan(maildir: str, previous: IndexData | None, *, trust_mtimes: bool = True) -> ScanResult:
    """Work out the current message list, reading as little as possible.

    1. If ``previous`` is trustworthy by directory mtimes: use it as is
       (two ``stat`` calls, no listing).
    2. Otherwise list ``new/`` then ``cur/`` (in that order: a file moved
       new -> cur during the listing is then seen at least once, and a
       duplicate is resolved in favour of ``cur/``), keep index order for
       known names and append unknown ones by (leading timestamp, name).
    3. Sizes come from ``,W=``, else from the index, else from reading the
       file once.

    The recorded mtimes are taken *before* listing, so anything that
    changes afterwards makes the next open list again.
    """
    started = time.time_ns()
    new_mtime = os.stat(os.path.join(maildir, "new")).st_mtime_ns
    cur_mtime = os.stat(os.path.join(maildir, "cur")).st_mtime_ns
    if trust_mtimes and previous is not None and previous.trustworthy(new_mtime, cur_mtime):
        return ScanResult(
            previous.listing, previous, needs_write=previous.outdated_format, listed=False
        )

    if previous is None:
        # Nothing is known yet: one ``scandir`` per directory lists and types
        # every name at once (rather than a listing, then a typing pass).
        listed = {subdir: set(_message_files(maildir, subdir)) for subdir in SUBDIRS}
    else:
        listed = {subdir: set(list_dir(maildir, subdir)) for subdir in SUBDIRS}
    listing = previous.listing if previous is not None else Listing()
    changed = previous is None
    moved: list[int] = []  # positions of index entries not found where they were
    for pos, (subdir, name) in enumerate(zip(listing.subdirs, listing.filenames, strict=True)):
        names = listed[subdir]
        if name in names:
            names.discard(name)
        else:
            moved.append(pos)
    if moved or listed["new"] or listed["cur"]:
        listing, reconciled = _reconcile(
            maildir, listing, moved, listed, typed=previous is None
        )
        changed = changed or reconciled

    index = IndexData(listing, new_mtime, cur_mtime, started)
    # Rewrite when the content changed, or when the new header would let the
    # next open skip listing and the old one would not.
    now_trusted = trust_mtimes and index.trustworthy(new_mtime, cur_mtime)
    needs_write = changed or bool(previous and previous.outdated_format) or (
        now_trusted and (previous is None or not previous.trustworthy(new_mtime, cur_mtime))
    )
    return ScanResult(listing, index, needs_write=needs_write, listed=True)


def _reconcile(
    maildir: str,
    listing: Listing,
    moved: list[int],
    listed: dict[str, set[str]],
    *,
    typed: bool = False,
) -> tuple[Listing, bool]:
    """Match names the index did not expect: renamed files, new files, vanished ones.

    ``listing`` is the index order with ``moved`` marking entries whose file
    was not where the index said; ``listed`` holds the names left over.
    A renamed file (new -> cur, flags changed) keeps its index position;
    genuinely new names are appended by (leading timestamp, name).  When a
    unique name shows up twice (another program copying rather than
    renaming), the entry the index knows wins, else the one in ``cur/``.
    ``typed`` says ``listed`` holds message files only (``_message_files``).
    Returns the new listing and whether it differs from the old one.
    """
    rest: dict[str, tuple[str, str]] = {}
    for subdir in SUBDIRS:  # cur/ last: it wins a duplicate
        names = listed[subdir] if typed else _messages_among(maildir, subdir, listed[subdir])
        for name in names:
            rest[unique_name(name)] = (subdir, name)
    gone: set[int] = set()
    for pos in moved:
        where = rest.pop(unique_name(listing.filenames[pos]), None)
        if where is None:
            gone.add(pos)  # deleted by someone else
        else:
            listing.move(pos, *where)
    changed = bool(moved)
    if gone:
        listing = listing.without(gone)
    if rest:
        if listing:
            known = set(map(unique_name, listing.filenames))
            keys = [key for key in rest if key not in known]
        else:
            keys = list(rest)
        added = _add_new_entries(maildir, listing, arrival_order(keys), rest)
        changed = changed or added
    return listing, changed


def _add_new_entries(
    maildir: str, listing: Listing, keys: list[str], where: dict[str, tuple[str, str]]
) -> bool:
    """Append an entry for each of ``keys`` (in order) to ``listing``; True if any was added.

    The cold open of a big maildrop runs this for every message, so it is
    one loop straight into the columns: files are opened relative to a
    descriptor of their directory, and sizes are read from ``,W=`` or,
    failing that, by ``measure``.  Anything unusual (a file renamed or
    deleted meanwhile, an unreadable one) goes to ``_new_entry``.
    """
    uids, subdirs, filenames = listing.uids, listing.subdirs, listing.filenames
    sizes = listing.sizes
    before = len(uids)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    dir_fds = {sub: os.open(os.path.join(maildir, sub), flags) for sub in SUBDIRS}
    try:
        for key in keys:
            subdir, name = where[key]
            size = wire_size_from_name(key)
            if size is None:
                try:
                    size = measure(name, dir_fd=dir_fds[subdir])
                except OSError:
                    entry = _new_entry(maildir, key, subdir, name)
                    if entry is not None:
                        listing.append(entry)
                    continue
            uids.append(derive_uidl(key))
            subdirs.append(subdir)
            filenames.append(name)
            sizes.append(size)
    finally:
        for fd in dir_fds.values():
            os.close(fd)
    return len(uids) > before


def _new_entry(maildir: str, key: str, subdir: str, name: str) -> Entry | None:
    """Build the entry for a name the index does not know; None if it vanished."""
    size = wire_size_from_name(key)
    if size is None:
        for _attempt in range(2):
            try:
                size = measure(os.path.join(maildir, subdir, name))
                break
            except FileNotFoundError:
                where = locate(maildir, key)
                if where is None:
                    return None
                subdir, name = where
            except OSError as exc:
                # One unreadable file must not lock its owner out of POP3;
                # it stays on disk for an administrator to look at.
                log.warning("skipping unreadable message %s/%s: %s", subdir, name, exc)
                return None
        else:
            return None
    return Entry(derive_uidl(key), subdir, name, size)

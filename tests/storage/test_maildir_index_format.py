"""The index file's column format: round trips, the old format, and damage that passes the CRC.

The location columns of a version 2 index are split lazily (on the first
read or delete), so everything that could make that split fail must be
rejected when the file is parsed: a session must never trip over a bad
cache in the middle of a RETR.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from mailbag.storage.base import MessageInfo, MessageList
from mailbag.storage.maildir_index import (
    INDEX_MAGIC,
    INDEX_MAGIC_V1,
    Entry,
    IndexData,
    Listing,
    format_index,
    read_index,
    write_index,
)
from mailbag.storage.maildir_names import derive_uidl

ODD = ["1700000000.M1P1.plain:2,S", "1700000001.M2P1.h\\057x\tta\\b\nline\r", "17.caf\udcff"]


def _listing() -> Listing:
    return Listing.of(
        [
            Entry(derive_uidl(name), "cur" if i % 2 else "new", name, 10 + i)
            for i, name in enumerate(ODD)
        ]
    )


def test_round_trip_keeps_every_column_including_odd_names(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    write_index(path, IndexData(_listing(), 11, 22, 33), fsync=False)
    read = read_index(path)
    assert read is not None
    assert (read.new_mtime_ns, read.cur_mtime_ns, read.scanned_ns) == (11, 22, 33)
    assert read.listing == _listing()
    assert read.listing.entry(1) == _listing().entry(1)
    assert not read.outdated_format


def test_empty_listing_round_trips(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    write_index(path, IndexData(Listing(), 1, 2, 3), fsync=False)
    read = read_index(path)
    assert read is not None and len(read.listing) == 0 and read.listing.filenames == []


def test_version_1_files_are_still_read_and_marked_for_rewriting(tmp_path: Path) -> None:
    listing = _listing()
    lines = [f"{INDEX_MAGIC_V1}\t11\t22\t33"]
    escapes = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
    escaped = ["".join(escapes.get(c, c) for c in n) for n in listing.filenames]
    lines += [f"{u}\t{d}\t{s}\t{n}" for u, d, s, n in
              zip(listing.uids, listing.subdirs, listing.sizes, escaped, strict=True)]
    body = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    path = tmp_path / "index"
    path.write_bytes(body + f"end\t{len(listing)}\t{zlib.crc32(body):08x}\n".encode())
    read = read_index(str(path))
    assert read is not None and read.outdated_format
    assert read.listing == listing


def _with_crc(body: str) -> bytes:
    data = body.encode("utf-8", "surrogateescape")
    count = body.split("\n", 1)[0].split("\t")[-1]
    return data + f"end\t{count}\t{zlib.crc32(data):08x}\n".encode()


@pytest.mark.parametrize(
    "change",
    [
        ("ncn", "nxn"),  # an unknown location code
        ("ncn", "nc"),  # a code missing
        ("\t17.caf", " 17.caf"),  # a name missing (tab count)
        (f"{INDEX_MAGIC}\t11\t22\t33\t3", f"{INDEX_MAGIC}\t11\t22\t33\t4"),  # count
    ],
)
def test_damage_with_a_valid_checksum_is_no_index(tmp_path: Path, change: tuple[str, str]) -> None:
    text = format_index(IndexData(_listing(), 11, 22, 33)).decode("utf-8", "surrogateescape")
    body = text[: text.rindex("end\t")]
    old, new = change
    assert old in body
    path = tmp_path / "index"
    path.write_bytes(_with_crc(body.replace(old, new, 1)))
    assert read_index(str(path)) is None


def test_message_list_behaves_like_a_tuple_of_message_info() -> None:
    infos = (MessageInfo("a", 1), MessageInfo("b", 2), MessageInfo("c", 3))
    messages = MessageList(["a", "b", "c"], [1, 2, 3])
    assert len(messages) == 3
    assert messages[1] == MessageInfo("b", 2) and messages[-1].size == 3
    assert list(messages) == list(infos) and messages == infos
    assert messages[1:] == infos[1:] and isinstance(messages[1:], MessageList)
    assert MessageInfo("c", 3) in messages and messages.index(MessageInfo("b", 2)) == 1
    assert messages != MessageList(["a"], [1])
    with pytest.raises(ValueError):
        MessageList(["a"], [])

"""Maildir written by other software, index loss and renames by other programs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailbag.errors import MessageGone
from mailbag.storage import maildir_index
from mailbag.storage.base import Usage
from mailbag.storage.maildir import INDEX_FILE, UIDL_OVERRIDE_FILE, MaildirStore
from mailbag.storage.maildir_index import Entry, IndexData, Listing, read_index, write_index
from mailbag.storage.maildir_names import derive_uidl, unique_name
from mailbag.wireform import to_wire
from tests.storage.helpers import read_all, run

OLD_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09, long before any test runs


def put(maildir: Path, subdir: str, name: str, data: bytes) -> Path:
    """Drop a file into the Maildir the way another delivery agent would."""
    path = maildir / subdir / name
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(data)
    return path


def dovecot_name(stamp: int, data: bytes, flags: str | None = "S") -> str:
    base = f"{stamp}.M{stamp % 1000}P300.mx,S={len(data)},W={len(to_wire(data))}"
    return base if flags is None else f"{base}:2,{flags}"


def snapshot(store: MaildirStore, user: str = "alice") -> list[tuple[str, int]]:
    async def go() -> list[tuple[str, int]]:
        md = await store.open_maildrop(user)
        try:
            return [(m.uid, m.size) for m in md.messages]
        finally:
            await md.close()

    return run(go())


def age_dirs(maildir: Path) -> None:
    """Pretend new/ and cur/ last changed long ago (as in a quiet maildrop)."""
    for sub in ("new", "cur"):
        os.utime(maildir / sub, ns=(OLD_NS, OLD_NS))


FOREIGN: list[tuple[str, str, bytes]] = [
    ("new", "1234567890.V801I1234M5678.host", b"From: postfix\n\nlocal(8) delivery\n"),
    ("cur", dovecot_name(1234567891, b"Subject: dc\n\nhello\n"), b"Subject: dc\n\nhello\n"),
    ("cur", "1234567892.M1P2.mx,S=20:2,RS", b"Subject: S only\n\nabc"),
    ("new", "1234567893.12345_0.procmail", b"Subject: crlf\r\n\r\nstored as CRLF\r\n"),
    ("cur", "1234567894.M9P9.h:2,", b"Subject: gbk\n\n\xd6\xd0\xce\xc4\xd3\xca\xbc\xfe\n"),
    ("new", "1234567895.M1P1.h", b"no trailing newline"),
]


@pytest.fixture
def foreign(tmp_path: Path) -> tuple[MaildirStore, Path]:
    """A Maildir filled by 'other software', and a store pointing at it."""
    maildir = tmp_path / "mail" / "alice"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, mode=0o700)
    for subdir, name, data in FOREIGN:
        put(maildir, subdir, name, data)
    return MaildirStore(str(tmp_path / "mail" / "{user}")), maildir


def test_foreign_names_are_listed_with_key_uidls_and_wire_sizes(
    foreign: tuple[MaildirStore, Path],
) -> None:
    store, _ = foreign

    async def go() -> None:
        md = await store.open_maildrop("alice")
        try:
            assert [m.uid for m in md.messages] == [
                derive_uidl(unique_name(name)) for _, name, _ in FOREIGN
            ]
            for info, (_, _, data) in zip(md.messages, FOREIGN, strict=True):
                assert info.size == len(to_wire(data))
                assert await read_all(md, info.uid) == data
        finally:
            await md.close()

    run(go())


def test_w_field_is_trusted_without_reading_the_file(tmp_path: Path) -> None:
    maildir = tmp_path / "mail" / "alice"
    put(maildir, "cur", "1700000000.M1P1.h,S=5,W=999:2,S", b"short")
    put(maildir, "new", "1700000001.M1P1.h", b"")
    store = MaildirStore(str(tmp_path / "mail" / "{user}"))
    assert snapshot(store) == [
        (derive_uidl("1700000000.M1P1.h,S=5,W=999"), 999),
        (derive_uidl("1700000001.M1P1.h"), 0),
    ]


def test_dotfiles_and_directories_are_not_messages(foreign: tuple[MaildirStore, Path]) -> None:
    store, maildir = foreign
    put(maildir, "new", ".editor-swap", b"junk")
    (maildir / "cur" / "1700000000.subdir").mkdir()
    assert len(snapshot(store)) == len(FOREIGN)


def test_move_new_to_cur_and_flag_changes_keep_uidl_and_size(
    foreign: tuple[MaildirStore, Path],
) -> None:
    store, maildir = foreign
    before = snapshot(store)
    name = "1234567890.V801I1234M5678.host"
    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")
    assert snapshot(store) == before
    os.rename(maildir / "cur" / f"{name}:2,S", maildir / "cur" / f"{name}:2,RST")
    assert snapshot(store) == before
    (maildir / INDEX_FILE).unlink()
    assert snapshot(store) == before


def test_read_and_delete_follow_a_file_renamed_during_the_session(
    foreign: tuple[MaildirStore, Path],
) -> None:
    store, maildir = foreign
    name = "1234567890.V801I1234M5678.host"

    async def go() -> None:
        md = await store.open_maildrop("alice")
        try:
            uid = md.messages[0].uid
            os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")
            assert await read_all(md, uid) == FOREIGN[0][2]
            os.rename(maildir / "cur" / f"{name}:2,S", maildir / "cur" / f"{name}:2,RS")
            result = await md.delete([uid])
        finally:
            await md.close()
        assert result.deleted == 1
        assert not any(p.name.startswith(name) for p in maildir.rglob("*"))

    run(go())


def test_message_deleted_by_another_program(foreign: tuple[MaildirStore, Path]) -> None:
    store, maildir = foreign

    async def go() -> None:
        md = await store.open_maildrop("alice")
        try:
            uid = md.messages[0].uid
            (maildir / "new" / FOREIGN[0][1]).unlink()
            with pytest.raises(MessageGone):
                await read_all(md, uid)
            result = await md.delete([uid])  # already gone counts as deleted
            assert (result.deleted, result.failed) == (1, ())
        finally:
            await md.close()

    run(go())


@pytest.mark.parametrize("damage", ["missing", "empty", "garbage", "truncated", "bitflip"])
def test_lost_or_corrupt_index_gives_same_uidls_and_sizes(
    foreign: tuple[MaildirStore, Path], damage: str
) -> None:
    store, maildir = foreign
    before = snapshot(store)
    index = maildir / INDEX_FILE
    data = index.read_bytes()
    assert read_index(str(index)) is not None
    if damage == "missing":
        index.unlink()
    elif damage == "empty":
        index.write_bytes(b"")
    elif damage == "garbage":
        index.write_bytes(os.urandom(4000))
    elif damage == "truncated":
        index.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        index.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :])
    age_dirs(maildir)  # the worst case: mtimes that would make a valid index trusted
    assert read_index(str(index)) is None
    assert snapshot(store) == before
    assert read_index(str(index)) is not None  # rebuilt


def test_index_entry_for_missing_file_with_wrong_size_is_dropped(
    foreign: tuple[MaildirStore, Path],
) -> None:
    store, maildir = foreign
    before = snapshot(store)
    index_path = str(maildir / INDEX_FILE)
    current = read_index(index_path)
    assert current is not None
    ghost = Entry(derive_uidl("1111111111.ghost"), "cur", "1111111111.ghost:2,S", 42)
    entries = [ghost, *(current.listing.entry(i) for i in range(len(current.listing)))]
    write_index(index_path, IndexData(Listing.of(entries), -1, -1, 0))
    assert snapshot(store) == before


def test_warm_open_with_quiet_directories_does_not_list_or_read(
    foreign: tuple[MaildirStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, maildir = foreign
    before = snapshot(store)
    age_dirs(maildir)
    assert snapshot(store) == before  # lists once more, then records trustworthy mtimes

    def forbidden(*args: object) -> None:
        raise AssertionError("should not touch messages")

    monkeypatch.setattr(maildir_index, "list_dir", forbidden)
    monkeypatch.setattr(maildir_index, "measure", forbidden)
    assert snapshot(store) == before


def test_index_saves_reading_files_on_the_next_open(
    foreign: tuple[MaildirStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, maildir = foreign
    before = snapshot(store)

    def forbidden(*args: object) -> None:
        raise AssertionError("should not read messages")

    monkeypatch.setattr(maildir_index, "measure", forbidden)
    put(maildir, "new", dovecot_name(1234567999, b"x\n", None), b"x\n")  # forces a listing
    after = snapshot(store)
    assert after[: len(before)] == before
    assert len(after) == len(before) + 1


def test_a_change_in_quiet_directories_is_noticed(foreign: tuple[MaildirStore, Path]) -> None:
    store, maildir = foreign
    snapshot(store)
    age_dirs(maildir)
    before = snapshot(store)
    os.rename(maildir / "new" / FOREIGN[0][1], maildir / "cur" / (FOREIGN[0][1] + ":2,S"))
    (maildir / "cur" / FOREIGN[1][1]).unlink()
    after = snapshot(store)
    assert after == [before[0], *before[2:]]


def test_arrival_order_is_stable_and_late_names_are_appended(
    foreign: tuple[MaildirStore, Path],
) -> None:
    store, maildir = foreign
    before = snapshot(store)
    put(maildir, "new", "1000000000.M1P1.early-timestamp", b"late arrival\n")
    put(maildir, "new", "999999999.M1P1.earlier", b"later arrival\n")
    after = snapshot(store)
    assert after[: len(before)] == before
    assert [uid for uid, _ in after[len(before) :]] == [
        derive_uidl("999999999.M1P1.earlier"),
        derive_uidl("1000000000.M1P1.early-timestamp"),
    ]


def test_uidl_override_file_is_honoured(foreign: tuple[MaildirStore, Path]) -> None:
    store, maildir = foreign
    before = snapshot(store)
    (maildir / UIDL_OVERRIDE_FILE).write_text(
        "# migrated from dovecot-uidlist\n"
        f"{FOREIGN[1][1]} 00000001.old-uidl\n"  # a full name: the flags are ignored
        f"{FOREIGN[0][1]} not valid because of spaces\n"
        "\n"
    )

    async def go() -> None:
        md = await store.open_maildrop("alice")
        try:
            uids = [m.uid for m in md.messages]
            assert uids[1] == "00000001.old-uidl"
            assert uids[0] == before[0][0]
            assert [m.size for m in md.messages] == [size for _, size in before]
            assert await read_all(md, "00000001.old-uidl") == FOREIGN[1][2]
            assert (await md.delete(["00000001.old-uidl"])).deleted == 1
        finally:
            await md.close()

    run(go())
    assert len(snapshot(store)) == len(FOREIGN) - 1


def test_our_deliveries_are_dovecot_compatible(maildir_store: MaildirStore, tmp_path: Path) -> None:
    message = b"Subject: hi\n\nbody\n"
    uid = run(maildir_store.deliver("alice", message))
    (name,) = os.listdir(tmp_path / "mail" / "alice" / "new")
    assert name.endswith(f",S={len(message)},W={len(to_wire(message))}")
    assert uid == derive_uidl(name)


def test_odd_file_names_survive_the_index(foreign: tuple[MaildirStore, Path]) -> None:
    store, maildir = foreign
    odd = "1700000000.M1P1.h\\057x\tta\\b\nline"
    put(maildir, "new", odd, b"odd name\n")
    before = snapshot(store)
    assert before[-1] == (derive_uidl(odd), len(b"odd name\r\n"))
    age_dirs(maildir)
    assert snapshot(store) == before  # written to the index...
    assert snapshot(store) == before  # ...and read back from it without listing

    async def go() -> None:
        md = await store.open_maildrop("alice")
        try:
            assert await read_all(md, derive_uidl(odd)) == b"odd name\n"
        finally:
            await md.close()

    run(go())


def test_same_unique_name_in_new_and_cur_is_listed_once(
    foreign: tuple[MaildirStore, Path],
) -> None:
    store, maildir = foreign
    name = FOREIGN[0][1]
    os.link(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")  # a copy in progress
    assert snapshot(store) == snapshot(store)
    uids = [uid for uid, _ in snapshot(store)]
    assert len(uids) == len(set(uids)) == len(FOREIGN)
    (maildir / INDEX_FILE).unlink()
    assert [uid for uid, _ in snapshot(store)] == uids


def test_usage_caches_sizes_unless_a_session_holds_the_maildrop(
    foreign: tuple[MaildirStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, maildir = foreign
    expected = Usage(len(FOREIGN), sum(len(to_wire(data)) for _, _, data in FOREIGN))

    async def go() -> None:
        md = await store.open_maildrop("alice")
        (maildir / INDEX_FILE).unlink()
        assert await store.usage("alice") == expected
        assert not (maildir / INDEX_FILE).exists()  # the lock holder owns the index
        await md.close()
        assert await store.usage("alice") == expected
        assert (maildir / INDEX_FILE).exists()

        def forbidden(*args: object) -> None:
            raise AssertionError("should not read messages")

        monkeypatch.setattr(maildir_index, "measure", forbidden)
        assert await store.usage("alice") == expected

    run(go())


def test_import_keeps_source_names_flags_and_override_file(tmp_path: Path) -> None:
    from mailbag.storage.base import ImportMessage, ImportOptions

    store = MaildirStore(str(tmp_path / "mail" / "{user}"))
    source = tmp_path / "src"
    source.write_bytes(b"Subject: linked\n\n")

    async def data() -> bytes:
        return b"Subject: seen\n\n"

    async def messages() -> AsyncIterator[ImportMessage]:
        yield ImportMessage(key="1700000000.M1P1.h", uid="kept-1", read=data, flags="RS",
                            received=1_700_000_000.0)
        yield ImportMessage(key="1700000001.M1P1.h", uid=None, read=data, path=str(source))

    result = run(store.import_messages("eve", messages(), ImportOptions(link=True)))
    maildir = tmp_path / "mail" / "eve"
    seen = maildir / "cur" / "1700000000.M1P1.h:2,RS"
    assert seen.read_bytes() == b"Subject: seen\n\n" and seen.stat().st_mtime == 1_700_000_000
    linked = maildir / "new" / "1700000001.M1P1.h"
    assert linked.stat().st_nlink == 2 and source.stat().st_ino == linked.stat().st_ino
    assert "1700000000.M1P1.h kept-1\n" in (maildir / "mailbag-uidl").read_text()
    assert result.uids[0] == "kept-1" and not list((maildir / "tmp").iterdir())


def test_import_in_place_takes_the_source_order_and_uidls(tmp_path: Path) -> None:
    # The Maildir to import is already where mailbag looks (Dovecot and mailbag
    # share it) and mailbag never indexed it: numbering follows the source, not names.
    from mailbag.storage.base import ImportMessage

    store = MaildirStore(str(tmp_path / "mail" / "{user}"))
    maildir = tmp_path / "mail" / "fay"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    names = ["1700000300.M1P1.h", "1700000100.M1P1.h", "1700000200.M1P1.h"]
    for name in names:
        (maildir / "cur" / f"{name}:2,S").write_bytes(f"Subject: {name}\n\n".encode())

    async def unused() -> bytes:
        raise AssertionError("a message already there is not read again")

    async def messages() -> AsyncIterator[ImportMessage]:
        for n, name in enumerate(names):
            yield ImportMessage(key=name, uid=f"dovecot-{n}", read=unused, flags="S")

    result = run(store.import_messages("fay", messages()))
    assert (result.imported, result.present) == (0, 3)

    async def listed() -> list[str]:
        md = await store.open_maildrop("fay")
        try:
            return [m.uid for m in md.messages]
        finally:
            await md.close()

    assert run(listed()) == ["dovecot-0", "dovecot-1", "dovecot-2"]

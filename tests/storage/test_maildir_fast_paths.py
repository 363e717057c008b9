"""The Maildir speed-ups give the same answers as the plain paths they shortcut.

``read`` opens cached files on the event loop and reads with ``RWF_NOWAIT``;
a cold scan of many names types them with one ``scandir``.  Each has a
fallback (worker thread; ``stat`` per name), and both must agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mailbag.errors import MessageGone
from mailbag.storage import maildir, maildir_drop, maildir_index
from mailbag.storage.base import WholeReader
from mailbag.storage.maildir import LOCK_FILE, MaildirStore
from mailbag.wireform import to_wire

from .helpers import read_all, run


def _store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(str(tmp_path / "mail" / "{user}"), fsync=False)


def test_scan_of_many_names_skips_dotfiles_directories_and_follows_symlinks(
    tmp_path: Path,
) -> None:
    maildir = tmp_path / "box"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    count = maildir_index.SCANDIR_MIN * 2
    for i in range(count):
        (maildir / "new" / f"{1700000000 + i}.M{i}P1.host").write_bytes(b"x\n")
    (maildir / "new" / ".hidden").write_bytes(b"not mail\n")
    (maildir / "new" / "1800000000.dir.host").mkdir()
    target = tmp_path / "outside"
    target.write_bytes(b"linked\n")
    (maildir / "new" / "1800000001.link.host").symlink_to(target)
    (maildir / "new" / "1800000002.dangling.host").symlink_to(tmp_path / "missing")

    names = set(os.listdir(maildir / "new"))
    fast = maildir_index._messages_among(str(maildir), "new", names)
    slow = [n for n in names if maildir_index.is_message(str(maildir), "new", n)]
    assert sorted(fast) == sorted(slow)
    assert len(fast) == count + 1  # the symlink to a file counts, as with os.stat
    # The cold open's single pass (no listing first) gives the same answer.
    assert sorted(maildir_index._message_files(str(maildir), "new")) == sorted(slow)


@pytest.mark.parametrize("nowait", [True, False])
@pytest.mark.parametrize("slow_open", ["no", "disk", "preempted"])
def test_read_gives_the_stored_bytes_on_every_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nowait: bool, slow_open: str
) -> None:
    """Inline opens stop after a slow open that read the disk, or after too many slow ones."""
    if not nowait:
        monkeypatch.setattr(maildir_drop, "_nowait_usable", [False])
    reads = iter(range(1000))
    if slow_open != "no":
        monkeypatch.setattr(maildir_drop, "SLOW_OPEN", -1.0)
        # Every open is slow; with "disk" each one also read blocks from the device.
        monkeypatch.setattr(
            maildir_drop, "thread_disk_reads", lambda: next(reads) if slow_open == "disk" else 7
        )
    store = _store(tmp_path)
    bodies = [b"a" * 10, os.urandom(3 * 70_000 + 5), b""]
    if slow_open == "preempted":
        bodies += [b"b\n"] * maildir_drop.PREEMPTED_OPENS

    async def go() -> None:
        uids = [await store.deliver("alice", body) for body in bodies]
        md = await store.open_maildrop("alice")
        try:
            for i, (uid, body) in enumerate(zip(uids, bodies, strict=True)):
                assert await read_all(md, uid, chunk_size=70_000) == body
                if slow_open == "preempted" and i < maildir_drop.PREEMPTED_OPENS:
                    assert md._inline_opens  # forgiven: no disk reads
            assert md._inline_opens is (slow_open == "no")
        finally:
            await md.close()

    run(go())


def test_read_follows_a_file_renamed_after_open(tmp_path: Path) -> None:
    store = _store(tmp_path)

    async def go() -> None:
        uid = await store.deliver("alice", b"hello\n")
        md = await store.open_maildrop("alice")
        try:
            new = tmp_path / "mail" / "alice" / "new"
            (name,) = os.listdir(new)
            os.rename(new / name, tmp_path / "mail" / "alice" / "cur" / f"{name}:2,S")
            assert await read_all(md, uid) == b"hello\n"
        finally:
            await md.close()

    run(go())


@pytest.mark.parametrize(
    "data",
    [b"", b"a", b"a\n", b"a\r\nb\n", b"a\rb", b"a\r", b"\n\n.\r\n", b"x" * 5000 + b"\r"],
)
@pytest.mark.parametrize("chunk", [1, 2, 3, 4096])
def test_measure_agrees_with_the_wire_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, chunk: int
) -> None:
    """One read for a small file, the streamed count across chunk edges otherwise."""
    monkeypatch.setattr(maildir_index, "SIZE_READ_CHUNK", chunk)
    path = tmp_path / "message"
    path.write_bytes(data)
    assert maildir_index.measure(str(path)) == len(to_wire(data))


def _count_thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every function the store hands to a worker thread."""
    hops: list[str] = []
    real = maildir.asyncio.to_thread

    async def counting(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(maildir.asyncio, "to_thread", counting)
    return hops


async def _open_close(store: MaildirStore, user: str = "alice") -> list[str]:
    md = await store.open_maildrop(user)
    try:
        return [m.uid for m in md.messages]
    finally:
        await md.close()


def test_a_recently_opened_small_maildrop_opens_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread hand-off for a warm small maildrop; the index write still goes to a thread."""
    store = _store(tmp_path)
    hops = _count_thread_hops(monkeypatch)

    async def go() -> None:
        first = await store.deliver("alice", b"one\n")
        hops.clear()
        assert await _open_close(store) == [first]
        assert hops == ["_open_sync"]  # never opened before: a worker thread
        hops.clear()
        assert await _open_close(store) == [first]
        assert hops == []  # warm, nothing to write: all on the loop
        second = await store.deliver("alice", b"two\n")
        hops.clear()
        assert await _open_close(store) == [first, second]
        assert hops == ["_finish_open"]  # the new index is written (and fsynced) in a thread

    run(go())


@pytest.mark.parametrize("case", ["disk", "big", "cleanup"])
def test_inline_opens_step_aside_when_they_could_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A slow open that read the disk, a big maildrop, and the tmp/ cleanup use threads."""
    store = _store(tmp_path)
    hops = _count_thread_hops(monkeypatch)
    if case == "disk":
        monkeypatch.setattr(maildir, "SLOW_OPEN", -1.0)
        reads = iter(range(1000))
        monkeypatch.setattr(maildir, "thread_disk_reads", lambda: next(reads))
    elif case == "big":
        monkeypatch.setattr(maildir, "INLINE_MAX_MESSAGES", 0)

    async def go() -> None:
        uid = await store.deliver("alice", b"one\n")
        await _open_close(store)
        if case == "cleanup":
            stale = tmp_path / "mail" / "alice" / "tmp" / "stale"
            stale.write_bytes(b"left over\n")
            os.utime(stale, (0, 0))
            os.utime(tmp_path / "mail" / "alice" / LOCK_FILE, (0, 0))  # cleanup is due
        hops.clear()
        assert await _open_close(store) == [uid]
        if case == "cleanup":
            assert hops == ["_finish_open"] and not stale.exists()
        else:
            assert hops == ([] if case == "disk" else ["_open_sync"])
            hops.clear()
            assert await _open_close(store) == [uid]
            assert hops == ["_open_sync"]  # after a disk read: threads for a while

    run(go())


@pytest.mark.parametrize("inline", [True, False])
def test_read_whole_gives_the_stored_bytes_or_none_above_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    """``WholeReader``: the same bytes as ``read``; None (stream instead) when too big."""
    if not inline:
        monkeypatch.setattr(maildir_drop, "_nowait_usable", [False])
    store = _store(tmp_path)
    bodies = [b"", b"x\n", os.urandom(5000), os.urandom(300_000)]

    async def go() -> None:
        uids = [await store.deliver("alice", body) for body in bodies]
        md = await store.open_maildrop("alice")
        try:
            assert isinstance(md, WholeReader)
            if not inline:
                md._inline_opens = False
            for uid, body in zip(uids, bodies, strict=True):
                whole = await md.read_whole(uid, 256 * 1024)
                assert whole == (body if len(body) <= 256 * 1024 else None)
                assert await read_all(md, uid) == body
            await md.delete([uids[1]])
            with pytest.raises(MessageGone):
                await md.read_whole(uids[1], 1024)
        finally:
            await md.close()

    run(go())

"""Maildir under stress: concurrent and killed deliveries, locks across
processes, tmp cleanup, path escapes, permissions and filesystem errors."""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailbag.errors import ConfigError, InvalidUsername, MaildropLocked, StorageError
from mailbag.storage import maildir as maildir_mod
from mailbag.storage.maildir import LOCK_FILE, MaildirStore
from mailbag.storage.maildir_names import derive_uidl, unique_name
from mailbag.wireform import to_wire
from tests.storage.deliver_worker import check_message, deliver_many
from tests.storage.helpers import HERE, read_all, run, subprocess_env

HOURS = 3600


def _maildir(tmp_path: Path, user: str = "alice") -> Path:
    return tmp_path / "mail" / user


def _visible_files(maildir: Path) -> list[Path]:
    return [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]


# -- concurrency and crashes -------------------------------------------------


def test_concurrent_deliveries_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    template = str(tmp_path / "mail" / "{user}")
    # fork, not spawn: the children inherit the already imported test helpers
    # (pytest's importlib mode does not put them on sys.path).
    ctx = multiprocessing.get_context("fork")
    jobs = [(template, "alice", 15, 2000, f"p{i}") for i in range(4)]
    with ctx.Pool(4) as pool:
        returned = pool.starmap_async(deliver_many, jobs).get(timeout=60)
    all_uids = [uid for uids in returned for uid in uids]
    assert len(set(all_uids)) == 60

    async def go() -> None:
        md = await MaildirStore(template).open_maildrop("alice")
        try:
            assert sorted(m.uid for m in md.messages) == sorted(all_uids)
            tags = [check_message(await read_all(md, m.uid)) for m in md.messages]
        finally:
            await md.close()
        assert sorted(tags) == sorted(f"p{i}-{n}" for i in range(4) for n in range(1, 16))

    run(go())


def test_delivery_killed_at_random_points_leaves_nothing_partial(tmp_path: Path) -> None:
    template = str(tmp_path / "mail" / "{user}")
    rng = random.Random(1939)
    delivered = 0
    for round_no in range(6):
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "deliver_worker.py"),
                template,
                "alice",
                "0",
                str(rng.randrange(200_000, 2_000_000)),
                f"r{round_no}",
            ],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one delivery completed: imports are done
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        delivered += 1
    maildir = _maildir(tmp_path)
    files = _visible_files(maildir)
    assert len(files) >= delivered
    for path in files:
        data = path.read_bytes()
        check_message(data)
        assert path.name.endswith(f",S={len(data)},W={len(to_wire(data))}")

    async def go() -> None:
        store = MaildirStore(template)
        md = await store.open_maildrop("alice")
        try:
            assert len(md.messages) == len(files)
            for m in md.messages:
                assert m.size == len(to_wire(await read_all(md, m.uid)))
        finally:
            await md.close()
        # Whatever the kills left in tmp/ is exactly what cleanup is for.
        await store.cleanup_tmp("alice", max_age=-1)
        assert list((maildir / "tmp").iterdir()) == []

    run(go())


def test_lock_held_by_another_process_and_released_when_it_is_killed(tmp_path: Path) -> None:
    template = str(tmp_path / "mail" / "{user}")
    holder = (
        "import asyncio, sys\n"
        "from mailbag.storage.maildir import MaildirStore\n"
        "async def main():\n"
        "    md = await MaildirStore(sys.argv[1]).open_maildrop('alice')\n"
        "    print('locked', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, template], env=subprocess_env(), stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"locked\n"
        with pytest.raises(MaildropLocked):
            run(MaildirStore(template).open_maildrop("alice"))
    finally:
        proc.kill()  # a crash: no close(), no cleanup
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert (_maildir(tmp_path) / LOCK_FILE).exists()  # the file stays, the lock does not

    async def go() -> None:
        md = await MaildirStore(template).open_maildrop("alice")
        await md.close()

    run(go())


def test_two_store_objects_in_one_process_conflict(tmp_path: Path) -> None:
    template = str(tmp_path / "mail" / "{user}")

    async def go() -> None:
        md = await MaildirStore(template).open_maildrop("alice")
        try:
            with pytest.raises(MaildropLocked):
                await MaildirStore(template).open_maildrop("alice")
        finally:
            await md.close()

    run(go())


# -- tmp cleanup ---------------------------------------------------------------


def _stale(path: Path, age: float) -> None:
    when = time.time() - age
    os.utime(path, (when, when))


def test_cleanup_tmp_removes_only_files_older_than_36_hours(
    maildir_store: MaildirStore, tmp_path: Path
) -> None:
    run(maildir_store.deliver("alice", b"x\n"))  # creates the Maildir
    tmp = _maildir(tmp_path) / "tmp"
    old, fresh, edge = tmp / "old", tmp / "fresh", tmp / "35h"
    for p in (old, fresh, edge):
        p.write_bytes(b"partial")
    _stale(old, 37 * HOURS)
    _stale(edge, 35 * HOURS)
    (tmp / "subdir").mkdir()
    assert run(maildir_store.cleanup_tmp("alice")) == 1
    assert sorted(p.name for p in tmp.iterdir()) == ["35h", "fresh", "subdir"]


def test_open_cleans_tmp_opportunistically_at_most_once_per_interval(tmp_path: Path) -> None:
    store = MaildirStore(str(tmp_path / "mail" / "{user}"))
    run(store.deliver("alice", b"x\n"))
    tmp = _maildir(tmp_path) / "tmp"

    def open_close() -> None:
        async def go() -> None:
            await (await store.open_maildrop("alice")).close()

        run(go())

    first = tmp / "first"
    first.write_bytes(b"junk")
    _stale(first, 40 * HOURS)
    open_close()  # first open ever: cleans
    assert not first.exists()
    second = tmp / "second"
    second.write_bytes(b"junk")
    _stale(second, 40 * HOURS)
    open_close()  # within the hour: does not look at tmp/ again
    assert second.exists()
    _stale(_maildir(tmp_path) / LOCK_FILE, 2 * HOURS)
    open_close()
    assert not second.exists()


# -- paths and permissions -------------------------------------------------------


@pytest.mark.parametrize("user", ["../etc", "..", "a/../../b", "x@.."])
def test_paths_escaping_the_root_are_refused(tmp_path: Path, user: str) -> None:
    store = MaildirStore(str(tmp_path / "mail" / "{domain}" / "{local}"))
    with pytest.raises(InvalidUsername):
        store.maildir_path(user)
    assert not (tmp_path / "etc").exists()


def test_template_fields_map_to_local_and_domain(tmp_path: Path) -> None:
    store = MaildirStore(str(tmp_path / "mail" / "{domain}" / "{local}"))
    assert store.maildir_path("bob@example.com") == str(tmp_path / "mail" / "example.com" / "bob")
    assert store.maildir_path("bob") == str(tmp_path / "mail" / "bob")


def test_explicit_root_is_enforced(tmp_path: Path) -> None:
    store = MaildirStore(str(tmp_path / "{user}" / "Maildir"), root=str(tmp_path / "home"))
    with pytest.raises(InvalidUsername):
        store.maildir_path("alice")


@pytest.mark.parametrize("template", ["/var/mail/static", "/var/mail/{uid}", "/var/{user"])
def test_bad_templates_are_config_errors(template: str) -> None:
    with pytest.raises(ConfigError):
        MaildirStore(template)


def test_files_are_0600_and_directories_0700(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        store = MaildirStore(str(tmp_path / "mail" / "{user}"))

        async def go() -> None:
            await store.deliver("alice", b"secret\n")
            await (await store.open_maildrop("alice")).close()

        run(go())
    finally:
        os.umask(old_umask)
    maildir = _maildir(tmp_path)
    for d in (maildir, maildir / "new", maildir / "cur", maildir / "tmp"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in [*_visible_files(maildir), maildir / "mailbag.index", maildir / LOCK_FILE]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


# -- errors ------------------------------------------------------------------------


def test_disk_full_during_delivery_is_a_storage_error_and_leaves_nothing(
    maildir_store: MaildirStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(maildir_mod, "write_all", full)
    with pytest.raises(StorageError, match="No space left on device") as info:
        run(maildir_store.deliver("alice", b"x\n"))
    assert str(_maildir(tmp_path)) in str(info.value)
    assert not isinstance(info.value, OSError)
    for sub in ("tmp", "new", "cur"):
        assert list((_maildir(tmp_path) / sub).iterdir()) == []


def test_unusable_maildir_is_a_storage_error_naming_the_path(
    maildir_store: MaildirStore, tmp_path: Path
) -> None:
    # Works as root too (chmod does not stop root): a file where a directory must be.
    maildir = _maildir(tmp_path)
    maildir.mkdir(parents=True)
    (maildir / "tmp").write_bytes(b"not a directory")
    with pytest.raises(StorageError, match=str(maildir / "tmp")):
        run(maildir_store.deliver("alice", b"x\n"))
    other = _maildir(tmp_path, "bob")
    other.mkdir(parents=True)
    (other / "cur").write_bytes(b"not a directory")
    with pytest.raises(StorageError, match=str(other / "cur")):
        run(maildir_store.open_maildrop("bob"))
    (other / "cur").unlink()

    async def go() -> None:  # the failed open released its lock
        await (await maildir_store.open_maildrop("bob")).close()

    run(go())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_maildir_is_a_storage_error(maildir_store: MaildirStore, tmp_path: Path) -> None:
    run(maildir_store.deliver("alice", b"x\n"))
    tmp = _maildir(tmp_path) / "tmp"
    tmp.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="Permission denied"):
            run(maildir_store.deliver("alice", b"y\n"))
    finally:
        tmp.chmod(0o700)


def test_failed_unlink_is_reported_per_message(
    maildir_store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        keep = await maildir_store.deliver("alice", b"keep\n")
        drop = await maildir_store.deliver("alice", b"drop\n")
        md = await maildir_store.open_maildrop("alice")
        real_unlink = os.unlink

        def picky_unlink(path: str) -> None:
            if derive_uidl(unique_name(os.path.basename(path))) == keep:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            real_unlink(path)

        monkeypatch.setattr(os, "unlink", picky_unlink)
        result = await md.delete([keep, drop])
        monkeypatch.undo()
        await md.close()
        assert (result.deleted, result.failed) == (1, (keep,))
        md = await maildir_store.open_maildrop("alice")
        assert [m.uid for m in md.messages] == [keep]
        await md.close()

    run(go())

"""``fetch`` interrupted at the worst moments resumes with nothing lost or duplicated.

Three interruptions: Ctrl-C in the middle of streaming a message, a crash
after the Maildir rename but before the journal commit, and a hard kill
(``os._exit`` in a forked child, so no cleanup runs) half-way through an
mbox append.  After each, a second ordinary ``fetch`` must leave exactly
one local copy of every server message.
"""

from __future__ import annotations

import json
import mailbox
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mailbag.client import localstore
from tests.client.conftest import Run
from tests.client.pop3servers import Target


def fill(target: Target, count: int) -> None:
    for n in range(1, count + 1):
        target.deliver(f"Subject: n{n}\r\nMessage-ID: <r{n}@x>\r\n\r\n".encode()
                       + b"line of body text\r\n" * 2000)


def ids(dest: Path, fmt: str) -> list[str]:
    box: mailbox.Mailbox[mailbox.Message] = (
        mailbox.Maildir(dest, create=False) if fmt == "maildir" else mailbox.mbox(dest))
    return sorted(str(m["Message-ID"]) for m in box)


def expected(count: int) -> list[str]:
    return sorted(f"<r{n}@x>" for n in range(1, count + 1))


def dest_arg(tmp_path: Path, fmt: str) -> tuple[Path, str]:
    if fmt == "maildir":
        return tmp_path / "md", f"{tmp_path / 'md'}/"
    return tmp_path / "box.mbox", str(tmp_path / "box.mbox")


@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_fetch_interrupted_mid_message_resumes(pop3: Target, run_cli: Run, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    fill(pop3, 5)
    dest, arg = dest_arg(tmp_path, fmt)
    original: Callable[[localstore.LocalLines, bytes], bytes] = localstore.LocalLines.feed
    fed = {"n": 0}

    def interrupting(self: localstore.LocalLines, chunk: bytes) -> bytes:
        fed["n"] += 1
        if fed["n"] == 4:  # some messages stored, this one half-written
            raise KeyboardInterrupt
        return original(self, chunk)

    monkeypatch.setattr(localstore.LocalLines, "feed", interrupting)
    assert run_cli(pop3, "fetch", "--to", arg, "--delete").code == 130
    monkeypatch.setattr(localstore.LocalLines, "feed", original)
    assert pop3.messages_on_disk() == 5  # no QUIT: the server deleted nothing
    assert len(ids(dest, fmt)) < 5
    result = json.loads(run_cli(pop3, "fetch", "--to", arg, "--delete", "--json").out)
    assert ids(dest, fmt) == expected(5)
    assert result["deleted"] == 5
    assert pop3.messages_on_disk() == 0


def test_fetch_crash_between_rename_and_commit_no_duplicate(
        pop3: Target, run_cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(pop3, 3)
    original = localstore.Journal.commit

    def crash(self: localstore.Journal, items: list[tuple[str, str]]) -> None:
        if items:
            raise KeyboardInterrupt  # files already in new/, D lines never written

    monkeypatch.setattr(localstore.Journal, "commit", crash)
    run_cli(pop3, "fetch", "--to", f"{tmp_path / 'md'}/")
    monkeypatch.setattr(localstore.Journal, "commit", original)
    assert len(ids(tmp_path / "md", "maildir")) == 3
    result = json.loads(run_cli(pop3, "fetch", "--to", str(tmp_path / "md"), "--json").out)
    assert ids(tmp_path / "md", "maildir") == expected(3)
    assert (result["fetched"], result["skipped"]) == (0, 3)  # settled from the B lines


def test_fetch_hard_kill_mid_mbox_append_is_repaired(pop3: Target, run_cli: Run,
                                                    tmp_path: Path) -> None:
    fill(pop3, 4)
    dest = tmp_path / "box.mbox"
    pid = os.fork()
    if pid == 0:  # child: die without any cleanup in the middle of message 3
        try:
            original = localstore.LocalLines.feed
            init = localstore.LocalLines.__init__
            made = {"n": 0}

            def counting(self: localstore.LocalLines, *, mboxrd: bool = False) -> None:
                made["n"] += 1  # one LocalLines per message
                init(self, mboxrd=mboxrd)

            def die(self: localstore.LocalLines, chunk: bytes) -> bytes:
                out = original(self, chunk)
                if made["n"] == 3 and len(out) > 100:
                    fd = os.open(dest, os.O_WRONLY | os.O_APPEND)
                    os.write(fd, out[: len(out) // 2])  # a torn, partial append
                    os._exit(9)
                return out

            localstore.LocalLines.__init__ = counting  # type: ignore[method-assign]
            localstore.LocalLines.feed = die  # type: ignore[method-assign]
            run_cli(pop3, "fetch", "--to", str(dest))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    torn = dest.read_bytes()
    assert torn and not torn.endswith(b"\n\n")
    result = json.loads(run_cli(pop3, "fetch", "--to", str(dest), "--json").out)
    assert ids(dest, "mbox") == expected(4)
    # The unflushed batch was cut back to its first offset and fetched again.
    assert result["fetched"] + result["skipped"] == 4
    assert dest.read_bytes().endswith(b"\n\n")

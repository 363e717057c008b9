"""``fetch`` with RFC 2449 PIPELINING against mailbag and Dovecot.

Both servers announce PIPELINING, so every fetch test runs pipelined; these
tests pin down what pipelining must not change: RETRs really go out in
groups, a DELE is sent only for a message whose D line is already on disk,
and a run interrupted with batches durable, DELEs sent and RETRs still in
flight resumes with nothing lost or duplicated.
"""

from __future__ import annotations

import json
import mailbox
from pathlib import Path

import pytest

from mailbag.client import fetch as fetch_module
from mailbag.client.account import parse_url
from mailbag.client.connection import open_session
from mailbag.client.pop3 import POP3Client
from tests.client.conftest import Run
from tests.client.pop3servers import Target

COUNT = 70


def fill(target: Target, count: int) -> None:
    for n in range(1, count + 1):
        target.deliver(f"Subject: p{n}\r\nMessage-ID: <p{n}@x>\r\n\r\nbody {n}\r\n".encode())


def server_uids(target: Target) -> dict[int, str]:
    account = parse_url(target.url).with_password(target.password)
    client = open_session(account, ca=target.ca)
    try:
        uids = client.uidl()
    finally:
        client.quit()
    assert uids is not None
    return uids


def stored_ids(dest: Path, fmt: str) -> list[str]:
    box: mailbox.Mailbox[mailbox.Message] = (
        mailbox.Maildir(dest, create=False) if fmt == "maildir" else mailbox.mbox(dest))
    return sorted(str(m["Message-ID"]) for m in box)


def journal_done(dest: Path) -> set[str]:
    """UIDs with a D line in the journal file, as on disk right now."""
    state = next(p for p in dest.parent.rglob("*mailbag-uidl*") if not p.name.endswith(".tmp"))
    return {line.split("\t")[1] for line in state.read_text().splitlines()
            if line.startswith("D\t")}


@pytest.mark.parametrize("fmt", ["maildir", "mbox"])
def test_fetch_pipelined_interrupted_and_resumed(pop3: Target, run_cli: Run, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 fmt: str) -> None:
    # RFC 2449 section 6.6: several commands in flight; DELE only after the local copy is durable.
    fill(pop3, COUNT)
    uids = server_uids(pop3)
    dest = tmp_path / ("md" if fmt == "maildir" else "box.mbox")
    arg = f"{dest}/" if fmt == "maildir" else str(dest)
    monkeypatch.setattr(fetch_module, "FLUSH_EVERY", 10)
    groups: list[list[str]] = []
    original_send = POP3Client.send_pipelined
    original_next = POP3Client.next_reply
    replies = {"n": 0}

    def checked_send(self: POP3Client, commands: list[str]) -> None:
        batch = list(commands)
        groups.append(batch)
        done = journal_done(dest)
        for command in batch:
            if command.startswith("DELE "):
                assert uids[int(command.split()[1])] in done, "DELE before durable"
        original_send(self, batch)

    def interrupting(self: POP3Client, sink: object = None) -> tuple[str, int | None]:
        replies["n"] += 1
        if replies["n"] == 45:  # several batches durable, DELEs sent, RETRs in flight
            raise KeyboardInterrupt
        return original_next(self, sink)  # type: ignore[arg-type]

    monkeypatch.setattr(POP3Client, "send_pipelined", checked_send)
    monkeypatch.setattr(POP3Client, "next_reply", interrupting)
    assert run_cli(pop3, "fetch", "--to", arg, "--delete").code == 130
    assert max(len(g) for g in groups) > 1  # really pipelined
    assert any(c.startswith("DELE") for g in groups for c in g)  # deletes were in flight
    assert pop3.messages_on_disk() == COUNT  # no QUIT: the server deleted nothing
    first = stored_ids(dest, fmt)
    assert 0 < len(first) < COUNT and len(set(first)) == len(first)

    monkeypatch.setattr(POP3Client, "next_reply", original_next)
    result = json.loads(run_cli(pop3, "fetch", "--to", arg, "--delete", "--json").out)
    assert stored_ids(dest, fmt) == sorted(f"<p{n}@x>" for n in range(1, COUNT + 1))
    assert result["fetched"] + result["skipped"] == COUNT
    assert result["deleted"] == COUNT
    assert pop3.messages_on_disk() == 0


def test_fetch_without_pipelining_sends_one_command_at_a_time(
        pop3: Target, run_cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(pop3, 5)
    groups: list[list[str]] = []
    original_send = POP3Client.send_pipelined

    def recording(self: POP3Client, commands: list[str]) -> None:
        if commands:
            groups.append(list(commands))
        original_send(self, commands)

    monkeypatch.setattr(POP3Client, "pipelining", property(lambda _self: False))
    monkeypatch.setattr(POP3Client, "send_pipelined", recording)
    result = json.loads(run_cli(pop3, "fetch", "--to", f"{tmp_path / 'md'}/", "--delete",
                                "--json").out)
    assert (result["fetched"], result["deleted"]) == (5, 5)
    assert groups and all(len(g) == 1 for g in groups)
    assert pop3.messages_on_disk() == 0


def test_list_pipelines_top_commands(pop3: Target, run_cli: Run,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 2449 section 6.6: TOP n 0 for a long listing goes out in groups.
    fill(pop3, 40)
    groups: list[list[str]] = []
    original_send = POP3Client.send_pipelined

    def recording(self: POP3Client, commands: list[str]) -> None:
        batch = list(commands)
        groups.append(batch)
        original_send(self, batch)

    monkeypatch.setattr(POP3Client, "send_pipelined", recording)
    data = json.loads(run_cli(pop3, "list", "--json").out)
    assert [m["subject"] for m in data["messages"]] == [f"p{n}" for n in range(1, 41)]
    assert [len(g) for g in groups] == [32, 8]
    assert groups[0][0] == "TOP 1 0" and groups[1][-1] == "TOP 40 0"

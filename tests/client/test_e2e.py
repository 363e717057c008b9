"""``mailbag mail`` end to end against real servers (mailbag and Dovecot).

Every test takes the ``pop3`` fixture, parametrized over both servers, so
the client is proven against two independent POP3 implementations.
"""

from __future__ import annotations

import json
import mailbox
import os
from pathlib import Path

import pytest

from tests.client.conftest import Run
from tests.client.pop3servers import Target

CORPUS = Path(__file__).parent.parent / "fixtures" / "mail"


def put(target: Target, *names: str) -> None:
    for name in names:
        target.deliver((CORPUS / name).read_bytes())


def numbered(n: int, extra: bytes = b"") -> bytes:
    return (f"From: sender{n}@example.cn\r\nSubject: =?utf-8?B?5rWL6K+V?= {n}\r\n"
            f"Message-ID: <m{n}@example.cn>\r\n\r\nbody {n}\r\n").encode() + extra


def test_list_shows_decoded_chinese_rows(pop3: Target, run_cli: Run) -> None:
    put(pop3, "zh_plain.eml", "rfc2231.eml", "big5.eml")
    result = run_cli(pop3, "list")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    row1 = next(line for line in lines if "周五聚餐的安排" in line)
    assert "王小明" in row1 and "2008-06-13 15:32" in row1
    row2 = next(line for line in lines if "attachments" in line and "a@example.cn" in line)
    assert row2.rstrip().endswith("+")
    assert any("陳大文" in line and "繁體中文測試" in line for line in lines)
    assert "3 messages" in result.out


def test_list_json_is_parseable(pop3: Target, run_cli: Run) -> None:
    put(pop3, "zh_plain.eml", "rfc2231.eml")
    data = json.loads(run_cli(pop3, "list", "--json").out)
    assert data["count"] == 2
    first, second = data["messages"]
    assert first["subject"] == "周五聚餐的安排"
    assert first["from"] == {"name": "王小明", "address": "xiaoming@example.cn"}
    assert first["uid"] and first["size"] > 0 and first["attachments"] is False
    assert second["attachments"] is True


def test_list_empty_mailbox(pop3: Target, run_cli: Run) -> None:
    result = run_cli(pop3, "list")
    assert result.code == 0 and "0 messages" in result.out


def test_read_shows_decoded_message(pop3: Target, run_cli: Run) -> None:
    put(pop3, "zh_plain.eml")
    result = run_cli(pop3, "read", "1")
    assert result.code == 0, result.err
    assert "Subject: 周五聚餐的安排" in result.out
    assert "From:    王小明 <xiaoming@example.cn>" in result.out
    assert "周五晚上七点在老地方聚餐，请回复是否参加。" in result.out


def test_read_json_has_body_and_attachments(pop3: Target, run_cli: Run) -> None:
    put(pop3, "rfc2231.eml")
    data = json.loads(run_cli(pop3, "read", "1", "--json").out)
    assert data["msn"] == 1 and data["body"] == "见附件"
    assert [a["filename"] for a in data["attachments"]][:3] == ["合同.pdf", "季度报告.xlsx",
                                                                "照片.png"]


def test_read_raw_is_byte_exact(pop3: Target, run_cli: Run) -> None:
    raw = (CORPUS / "raw8bit_header.eml").read_bytes()
    pop3.deliver(raw)
    assert run_cli(pop3, "read", "1", "--raw").raw == raw


def test_read_dot_stuffed_and_long_lines_survive(pop3: Target, run_cli: Run) -> None:
    body = b".leading dot\r\n..two\r\n.\r\nx" + b"y" * 10_000 + b"\r\n"
    raw = b"Subject: dots\r\n\r\n" + body
    pop3.deliver(raw)
    assert run_cli(pop3, "read", "1", "--raw").raw == raw


def test_read_pop3s_implicit_tls(pop3: Target, run_cli: Run) -> None:
    put(pop3, "big5.eml")
    result = run_cli(pop3, "read", "1", tls=True)
    assert result.code == 0, result.err
    assert "這是一封繁體中文郵件。" in result.out


def test_read_untrusted_certificate_is_an_error(pop3: Target, run_cli: Run,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILBAG_PASSWORD", pop3.password)
    result = run_cli(None, "-a", pop3.url_tls, "list")
    assert result.code != 0
    assert "certificate" in result.err.lower() or "tls" in result.err.lower()


def test_read_wrong_password_fails_cleanly(pop3: Target, run_cli: Run) -> None:
    result = run_cli(pop3, "list", password="wrong-password")
    assert result.code != 0 and "wrong-password" not in result.err + result.out
    assert "mailbag: error" in result.err


def test_read_no_such_message(pop3: Target, run_cli: Run) -> None:
    result = run_cli(pop3, "read", "9")
    assert result.code != 0 and "RETR" in result.err


def test_save_writes_attachments_with_safe_names(pop3: Target, run_cli: Run,
                                                 tmp_path: Path) -> None:
    put(pop3, "rfc2231.eml")
    target = tmp_path / "out" / "inner"
    result = run_cli(pop3, "save", "1", "--to", str(target))
    assert result.code == 0, result.err
    assert sorted(os.listdir(target)) == sorted(["合同.pdf", "季度报告.xlsx", "照片.png",
                                                 "evil.sh"])
    assert (target / "合同.pdf").read_bytes() == b"%PDF-1.4\n"
    assert (target / "evil.sh").read_bytes() == b"echo pwned"
    assert not (tmp_path / "etc").exists() and not Path("/etc/cron.d/evil.sh").exists()
    # Saving again never overwrites: numbered copies appear instead.
    run_cli(pop3, "save", "1", "--to", str(target), "--part", "1")
    assert (target / "合同 (1).pdf").exists()


def test_delete_removes_only_named_messages(pop3: Target, run_cli: Run) -> None:
    for n in (1, 2, 3):
        pop3.deliver(numbered(n))
    result = run_cli(pop3, "delete", "2", "--yes")
    assert result.code == 0, result.err
    data = json.loads(run_cli(pop3, "list", "--json").out)
    assert [m["subject"] for m in data["messages"]] == ["测试 1", "测试 3"]


def test_delete_without_confirmation_undeletes(pop3: Target, run_cli: Run) -> None:
    pop3.deliver(numbered(1))
    result = run_cli(pop3, "delete", "1")  # stdin is not a terminal: refuse, RSET
    assert result.code != 0 and "--yes" in result.err
    assert json.loads(run_cli(pop3, "list", "--json").out)["count"] == 1


def test_fetch_maildir_uidl_state_fetches_each_message_once(pop3: Target, run_cli: Run,
                                                           tmp_path: Path) -> None:
    for n in (1, 2, 3):
        pop3.deliver(numbered(n))
    dest = tmp_path / "Maildir"
    first = json.loads(run_cli(pop3, "fetch", "--to", f"{dest}/", "--json").out)
    assert (first["fetched"], first["skipped"]) == (3, 0)
    box = mailbox.Maildir(dest, create=False)
    assert sorted(m["Message-ID"] for m in box) == [f"<m{n}@example.cn>" for n in (1, 2, 3)]
    assert b"\r\n" not in next(iter(box)).as_bytes()  # stored with local LF line ends
    second = json.loads(run_cli(pop3, "fetch", "--to", str(dest), "--json").out)
    assert (second["fetched"], second["skipped"]) == (0, 3)
    pop3.deliver(numbered(4))
    third = json.loads(run_cli(pop3, "fetch", "--to", str(dest), "--json").out)
    assert (third["fetched"], third["skipped"]) == (1, 3)
    assert len(mailbox.Maildir(dest, create=False)) == 4
    assert pop3.messages_on_disk() == 4  # leave on server is the default


def test_fetch_mbox_uidl_state_and_from_quoting(pop3: Target, run_cli: Run,
                                                tmp_path: Path) -> None:
    pop3.deliver(numbered(1, b"From here on, quoted\r\n>From already\r\n"))
    pop3.deliver(numbered(2))
    dest = tmp_path / "inbox.mbox"
    result = run_cli(pop3, "fetch", "--to", str(dest))
    assert result.code == 0, result.err
    assert "fetched 2 messages" in result.out
    box = mailbox.mbox(dest, create=False)
    msgs = list(box)
    assert [m["Message-ID"] for m in msgs] == ["<m1@example.cn>", "<m2@example.cn>"]
    assert b"\n>From here on" in dest.read_bytes() and b"\n>>From already" in dest.read_bytes()
    again = json.loads(run_cli(pop3, "fetch", "--to", str(dest), "--json").out)
    assert again["fetched"] == 0 and len(mailbox.mbox(dest, create=False)) == 2


def test_fetch_delete_removes_from_server_after_local_write(pop3: Target, run_cli: Run,
                                                          tmp_path: Path) -> None:
    for n in (1, 2):
        pop3.deliver(numbered(n))
    dest = tmp_path / "md"
    run_cli(pop3, "fetch", "--to", f"{dest}/")  # keep: stored, still on server
    pop3.deliver(numbered(3))
    data = json.loads(run_cli(pop3, "fetch", "--to", str(dest), "--delete", "--json").out)
    assert (data["fetched"], data["deleted"]) == (1, 3)
    assert json.loads(run_cli(pop3, "list", "--json").out)["count"] == 0
    assert len(mailbox.Maildir(dest, create=False)) == 3


def test_list_narrow_terminal_keeps_numbers(pop3: Target, run_cli: Run,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    put(pop3, "zh_plain.eml", "rfc2231.eml")
    monkeypatch.setenv("COLUMNS", "30")
    lines = run_cli(pop3, "list").out.splitlines()
    assert all(len(line.rstrip()) <= 30 for line in lines[:-1])
    assert lines[2].lstrip().startswith("1 ") and lines[3].lstrip().startswith("2 ")
    assert "\x1b" not in "".join(lines)  # NO_COLOR and not a terminal: plain text


def test_delete_by_uid_survives_shifted_numbers(pop3: Target, run_cli: Run) -> None:
    for n in (1, 2, 3, 4):
        pop3.deliver(numbered(n))
    listing = json.loads(run_cli(pop3, "list", "--json").out)["messages"]
    uid3 = next(m["uid"] for m in listing if m["subject"] == "测试 3")
    assert run_cli(pop3, "delete", "1", "--yes").code == 0  # numbers shift: "测试 3" is now 2
    result = run_cli(pop3, "delete", "--uid", uid3, "--yes")
    assert result.code == 0, result.err
    assert "测试 3" in result.out
    data = json.loads(run_cli(pop3, "list", "--json").out)
    assert [m["subject"] for m in data["messages"]] == ["测试 2", "测试 4"]


def test_delete_by_unknown_uid_deletes_nothing(pop3: Target, run_cli: Run) -> None:
    pop3.deliver(numbered(1))
    result = run_cli(pop3, "delete", "1", "--uid", "no-such-uid", "--yes")
    assert result.code != 0 and "no-such-uid" in result.err
    assert json.loads(run_cli(pop3, "list", "--json").out)["count"] == 1


def test_json_schema_is_in_help_and_matches_the_output(pop3: Target, run_cli: Run) -> None:
    import contextlib
    import io
    import re

    from mailbag.cli.main import main

    put(pop3, "rfc2231.eml")
    outputs = {"list": json.loads(run_cli(pop3, "list", "--json").out),
               "read": json.loads(run_cli(pop3, "read", "1", "--json").out)}
    for action in ("list", "read"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
            main(["mail", action, "--help"])
        help_text = buf.getvalue()
        assert f"{action} --json prints one object" in help_text
        documented = set(re.findall(r'"([a-z_]+)":', help_text))
        data = outputs[action]
        actual = set(data) | set(data.get("messages", [{}])[0]) | set(
            data.get("attachments", [{}])[0])
        if action == "list":
            actual |= set(data["messages"][0]["from"])
        assert documented == actual

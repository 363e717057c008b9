"""``mailbag mail shell`` driven through a real pseudo-terminal.

The shell is exec'ed in a fresh interpreter on the slave side of a pty, so
readline, tab completion, getpass's no-echo mode and the prompt behave as
for a person at a terminal.
"""

from __future__ import annotations

import os
import pty
import re
import select
import sys
import time
from pathlib import Path

from tests.client.pop3servers import Target

CORPUS = Path(__file__).parent.parent / "fixtures" / "mail"


class Pty:
    """A child process on a pty, with expect-style reading."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:
            os.execve(sys.executable, [sys.executable, "-m", "mailbag", *argv], env)
        self.pid, self.fd, self.seen = pid, fd, b""

    def expect(self, text: str, timeout: float = 10.0) -> str:
        want = text.encode()
        deadline = time.monotonic() + timeout
        while want not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not seen in:\n{self.seen.decode(errors='replace')}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"EOF before {text!r}:\n{self.seen.decode()}")
                self.seen += data
        head, _, tail = self.seen.partition(want)
        self.seen = tail
        return re.sub(r"\x1b\[[0-9;]*m", "", (head + want).decode("utf-8", "replace"))

    def prompt(self, timeout: float = 10.0) -> str:
        """Everything up to the next idle ``C: `` prompt (trace lines also start with C:)."""
        out = ""
        deadline = time.monotonic() + timeout
        while True:
            out += self.expect("C: ", max(0.1, deadline - time.monotonic()))
            if not self.seen and not select.select([self.fd], [], [], 0.2)[0]:
                return out

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if select.select([self.fd], [], [], 0.05)[0]:
                    self.seen += os.read(self.fd, 65536)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError("shell did not exit")


def env_for(target: Target, home: Path, password: bool = True) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "TERM": "xterm", "NO_COLOR": "1", "COLUMNS": "100", "LANG": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    if password:
        env["MAILBAG_PASSWORD"] = target.password
    return env


def test_shell_raw_protocol_completion_and_decoded_retr(pop3: Target, tmp_path: Path) -> None:
    pop3.deliver((CORPUS / "zh_plain.eml").read_bytes())
    home = Path(os.environ["HOME"])
    sh = Pty(["mail", "-a", pop3.url, "--ca", pop3.ca, "shell"], env_for(pop3, home))
    transcript = sh.prompt()
    assert "S: +OK" in transcript
    sh.send("STA\t")  # tab completion of the command word (STAT, not STLS)
    sh.send("\r")
    assert "S: +OK 1 " in sh.prompt()
    sh.send("RETR 1\r")
    out = sh.prompt()
    assert "S: Subject: =?gb2312?B?" in out  # the raw protocol, as telnet showed it
    assert "Subject: 周五聚餐的安排" in out  # and the decoded view
    assert "周五晚上七点在老地方聚餐" in out
    sh.send("DELE 1\r")
    sh.expect("S: +OK")
    sh.send("RSET\r")  # undelete within the session
    sh.expect("S: +OK")
    sh.send("\x1b[A\x1b[A\r")  # history: Up, Up recalls DELE 1
    sh.expect("S: +OK")
    sh.send("RSET\r")
    sh.prompt()
    sh.send("QUIT\r")
    assert sh.wait() == 0
    assert pop3.messages_on_disk() == 1
    history = (home / ".local" / "state" / "mailbag" / "shell_history").read_text()
    assert "RETR 1" in history and pop3.password not in history


def test_shell_pass_prompt_does_not_echo(pop3: Target, tmp_path: Path) -> None:
    home = Path(os.environ["HOME"])
    sh = Pty(["mail", "-a", pop3.url, "--ca", pop3.ca, "shell", "--no-login"],
             env_for(pop3, home, password=False))
    sh.prompt()
    sh.send(f"USER {pop3.user}\r")
    sh.expect("S: +OK")
    sh.send("PASS\r")
    sh.expect("Password (not echoed): ")
    sh.send(pop3.password + "\r")
    out = sh.prompt()
    assert "S: +OK" in out and pop3.password not in out
    assert "C: PASS ********" in out
    sh.send("LIST\r")
    assert "S: ." in sh.prompt()
    sh.send("\x04")  # Ctrl-D sends QUIT
    assert sh.wait() == 0

"""``shell``: the telnet session from the seed blog post, made pleasant.

You type POP3 commands after ``C:`` and see the server's lines after ``S:``,
exactly as on the wire, so the protocol stays learnable.  What telnet could
not give: line editing and history (``readline``), tab completion of
commands, passwords that are never echoed nor kept in history (``PASS``
alone prompts with ``getpass``), TLS, and after ``RETR``/``TOP`` the same
message decoded as ``mailbag mail read`` shows it -- Chinese subjects and
bodies readable instead of ``=?gb2312?B?...?=`` and GBK bytes.
"""

from __future__ import annotations

import contextlib
import getpass
import os
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.text import Text

from mailbag.client.account import Account
from mailbag.client.connection import open_session, ssl_context
from mailbag.client.headers import printable
from mailbag.client.pop3 import POP3Client, POP3Error, POP3ProtocolError
from mailbag.client.render import parse_bytes, render
from mailbag.client.table import print_message

try:
    import readline
except ImportError:  # pragma: no cover - Windows without pyreadline
    readline = None  # type: ignore[assignment]

POP3_COMMANDS = ("USER", "PASS", "APOP", "AUTH", "STAT", "LIST", "UIDL", "RETR", "TOP",
                 "DELE", "RSET", "NOOP", "QUIT", "CAPA", "STLS", "UTF8")
LOCAL_COMMANDS = ("help", "show", "login", "raw")
HELP = """\
Type POP3 commands as on the wire (RFC 1939), e.g.  STAT  LIST  UIDL  TOP 1 0  RETR 1
DELE 1  RSET  QUIT.  Tab completes, Up/Down recall history.  Local commands:
  show N      RETR N and show it decoded only
  raw on|off  after RETR/TOP, also print the raw lines (default on, first 40 lines)
  login       log in with the account's password (env, ~/.netrc or a prompt)
  help        this text.  Ctrl-D sends QUIT.
PASS with no argument asks for the password without echo; DELE only marks a
message: the server deletes it at QUIT, and RSET undoes every mark."""
RAW_PREVIEW_LINES = 40


def history_path() -> Path:
    """``$XDG_STATE_HOME/mailbag/shell_history`` (never holds passwords)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mailbag" / "shell_history"


def completer_for(words: tuple[str, ...]) -> Callable[[str, int], str | None]:
    """readline completer: POP3 verbs (in the case typed) and local commands."""

    def complete(text: str, state: int) -> str | None:
        line = readline.get_line_buffer() if readline else text
        if line.strip() and " " in line.lstrip():
            return None  # only the command word is completed
        lower = text.islower()
        options = [w.lower() if lower else w for w in words
                   if w.upper().startswith(text.upper())]
        return options[state] + " " if state < len(options) else None

    return complete


class Shell:
    """An interactive POP3 session on one connection."""

    def __init__(self, account: Account, console: Console, *, ca: str | None = None,
                 insecure: bool = False, login: bool = True) -> None:
        self.account = account
        self.console = console
        self.ca = ca
        self.insecure = insecure
        self.auto_login = login
        self.show_raw = True
        self.echo_commands = True
        self.client: POP3Client | None = None

    def _trace(self, direction: str, line: str) -> None:
        if direction == "C" and not self.echo_commands:
            return  # the user's own line is already on screen after the C: prompt
        style = "cyan" if direction == "C" else "green"
        self.console.print(Text(f"{direction}: {printable(line)}", style=style))

    def _print_body(self, data: bytes, limit: int | None) -> None:
        """Show a multi-line body as S: lines (a message is cut at ``limit`` lines)."""
        lines = data.decode("utf-8", "replace").split("\r\n")
        if lines and lines[-1] == "":
            lines.pop()
        for line in lines[:limit]:
            self.console.print(Text("S: " + printable(line), style="dim"))
        if limit is not None and len(lines) > limit:
            self.console.print(Text(f"S: ... {len(lines) - limit} more lines "
                                    "(decoded below; `raw off` hides this)", style="dim"))
        self.console.print(Text("S: .", style="dim"))

    def _decoded(self, data: bytes) -> None:
        """The message as ``mailbag mail read`` shows it."""
        self.console.rule("decoded", style="dim")
        print_message(render(parse_bytes(data)), self.console)
        self.console.rule(style="dim")

    def connect(self) -> None:
        """Open the connection (greeting, CAPA, STLS shown) and log in if asked."""
        account = self.account
        if self.auto_login and account.password is not None:
            self.client = open_session(account, ca=self.ca, insecure=self.insecure,
                                       trace=self._trace)
        else:
            self.client = open_session(account, ca=self.ca, insecure=self.insecure,
                                       trace=self._trace, login=False)

    def execute(self, line: str) -> bool:
        """Run one input line; return False when the session is over."""
        assert self.client is not None
        words = line.split()
        if not words:
            return True
        verb = words[0].upper()
        if words[0].lower() == "help":
            self.console.print(Text(HELP))
        elif words[0].lower() == "raw":
            self.show_raw = len(words) < 2 or words[1].lower() != "off"
            self.console.print(Text(f"raw lines {'on' if self.show_raw else 'off'}"))
        elif words[0].lower() == "login":
            self.echo_commands = True
            if self.account.password is None:
                raise POP3Error("-ERR no password available (use PASS)", "login")
            self.client.login(self.account.user, self.account.password, self.account.mechanism)
        elif words[0].lower() == "show" and len(words) == 2:
            self.echo_commands = True
            self._decoded(self.client.retr_bytes(int(words[1])))
        elif verb == "PASS" and len(words) == 1:
            secret = getpass.getpass("Password (not echoed): ")
            self.echo_commands = True  # shows "C: PASS ********"
            self._raw(f"PASS {secret}")
        elif verb == "STLS":
            self.client.stls(ssl_context(self.ca, self.insecure))
        elif verb == "QUIT":
            self.client.quit()
            return False
        else:
            self._raw(line.strip())
        return True

    def _raw(self, line: str) -> None:
        assert self.client is not None
        chunks: list[bytes] = []
        _status, octets = self.client.raw(line, chunks.append)
        if octets is None:
            return
        data = b"".join(chunks)
        if line.split()[0].upper() in {"RETR", "TOP"}:
            if self.show_raw:
                self._print_body(data, RAW_PREVIEW_LINES)
            self._decoded(data)
        else:
            self._print_body(data, None)

    def _setup_readline(self) -> Path | None:
        if readline is None:
            return None
        readline.set_completer(completer_for(POP3_COMMANDS + LOCAL_COMMANDS))
        readline.set_completer_delims(" ")
        readline.parse_and_bind("tab: complete")
        readline.set_auto_history(False)
        path = history_path()
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
        return path

    def run(self) -> int:
        """The read-eval-print loop; returns the exit status."""
        self.console.print(Text(f"Connecting to {self.account.host}:{self.account.port} "
                                "(type help; Tab completes)", style="dim"))
        self.connect()
        history = self._setup_readline()
        try:
            while True:
                try:
                    line = input("C: ")
                except EOFError:
                    self.console.print()
                    line = "QUIT"
                except KeyboardInterrupt:
                    self.console.print()
                    continue
                if readline is not None and line.strip() and \
                        not line.strip().upper().startswith(("PASS", "AUTH")):
                    readline.add_history(line)
                self.echo_commands = False
                try:
                    if not self.execute(line):
                        return 0
                except POP3Error:
                    continue  # the -ERR line was already shown by the trace
                except ValueError:
                    self.console.print(Text("usage: show N", style="red"))
        except POP3ProtocolError as exc:
            self.console.print(Text(f"connection lost: {exc}", style="red"))
            return 1
        finally:
            if history is not None and readline is not None:
                with contextlib.suppress(OSError):
                    history.parent.mkdir(parents=True, exist_ok=True)
                    readline.write_history_file(history)
                    history.chmod(0o600)
            if self.client is not None:
                self.client.close()

"""A blocking POP3 client that streams message bodies (RFC 1939, 2449, 2595, 5034).

Why not ``poplib``: it returns RETR as a list of lines held in memory, has a
2,048-octet line limit, and gives no hook to show the protocol as it runs.
Why blocking rather than asyncio: every caller is a terminal command doing
one thing at a time (list, read, a fetch loop, an interactive shell), and a
plain socket keeps readline, getpass and Ctrl-C behaviour simple.

Logins: SASL SCRAM-SHA-256 (the server's signature is verified), SASL PLAIN,
APOP and USER/PASS; which one is chosen by :mod:`mailbag.client.sasl`.

Security rules enforced here rather than by callers:

* after ``STLS`` is answered ``+OK``, bytes the server sent before the TLS
  handshake are an injection attempt (CVE-2011-0411 class): we abort;
* a server that advertised STLS and then refuses or fails it is an error,
  never a silent fall back to plaintext;
* the trace hook sees ``PASS ********``, ``AUTH PLAIN ********`` and
  ``APOP user ********``, never the secret;
* a SCRAM server that does not prove it knows the password is refused.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from mailbag.client import sasl
from mailbag.client.dotstuff import DotUnstuffer
from mailbag.errors import MailbagError

#: Longest status line we accept (RFC 2449 allows 512 octets; be generous).
MAX_STATUS_LINE = 8192
#: Receive size: large reads keep Python-level work per byte small.
RECV_SIZE = 256 * 1024

Trace = Callable[[str, str], None]
Sink = Callable[[bytes], object]
TlsMode = Literal["implicit", "starttls", "none"]
_RESPONSE_CODE = re.compile(r"^\[([^\]]+)\]\s*")


class POP3Error(MailbagError):
    """The server answered ``-ERR``; ``code`` is the RFC 2449 response code."""

    def __init__(self, response: str, command: str = "") -> None:
        text = response[4:].strip() if response.startswith("-ERR") else response
        match = _RESPONSE_CODE.match(text)
        self.code = match.group(1).upper() if match else None
        self.response = response
        self.command = command
        super().__init__(f"server refused {command}: {text}" if command else text)


class POP3ProtocolError(MailbagError):
    """The connection broke or the server said something that is not POP3."""


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One line of a LIST or UIDL answer."""

    msn: int
    value: str


def _redact(line: str) -> str:
    upper = line.upper()
    if upper.startswith("PASS "):
        return "PASS ********"
    if upper.startswith("APOP ") and len(line.split()) > 2:
        return " ".join(line.split()[:2]) + " ********"
    if upper.startswith("AUTH ") and len(line.split()) > 2:
        return " ".join(line.split()[:2]) + " ********"
    return line


class POP3Client:
    """One POP3 connection.  Use :meth:`connect`; close with :meth:`quit`."""

    def __init__(self, sock: socket.socket, host: str, *, trace: Trace | None = None) -> None:
        self._sock = sock
        self._host = host
        self._buf = b""
        self._trace = trace
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.greeting = ""
        self.capabilities: dict[str, list[str]] | None = None
        self.in_multiline = False
        #: The login method used (see client.sasl.MECHANISMS), once logged in.
        self.mechanism: str | None = None
        #: Commands sent with :meth:`send_pipelined` whose replies are not read yet.
        self.inflight: deque[str] = deque()

    # -- connection -------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: TlsMode = "starttls",
        context: ssl.SSLContext | None = None,
        timeout: float = 60.0,
        trace: Trace | None = None,
    ) -> POP3Client:
        """Connect, read the greeting, learn CAPA and upgrade with STLS if offered."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise POP3ProtocolError(f"cannot connect to {host}:{port}: {exc}") from exc
        context = context or ssl.create_default_context()
        if tls == "implicit":
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise POP3ProtocolError(f"TLS handshake with {host}:{port} failed: {exc}") from exc
        client = cls(sock, host, trace=trace)
        try:
            client.greeting = client._status("")
            client.capa()
            if tls == "starttls" and not client.tls and client.has_capability("STLS"):
                client.stls(context)
        except BaseException:
            client.close()
            raise
        return client

    def stls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS (RFC 2595); any failure is fatal, never a downgrade."""
        self._send("STLS")
        line = self._read_status_line()
        if not line.startswith("+OK"):
            raise POP3ProtocolError(f"server offered STLS but refused it: {line}")
        if self._buf:
            raise POP3ProtocolError("server sent data before the TLS handshake (injection?)")
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=self._host)
        except (ssl.SSLError, OSError) as exc:
            raise POP3ProtocolError(f"STLS handshake failed: {exc}") from exc
        self.tls = True
        self.capa()  # RFC 2595 section 4: capabilities may change after TLS

    def close(self) -> None:
        """Drop the connection without QUIT: the server rolls back DELE marks."""
        with contextlib.suppress(OSError):
            self._sock.close()

    def quit(self) -> str:
        """End the session; the server commits DELE marks only now (UPDATE state)."""
        try:
            return self._status("QUIT")
        finally:
            self.close()

    # -- low level I/O ----------------------------------------------------------

    def _emit(self, direction: str, line: str) -> None:
        if self._trace is not None:
            self._trace(direction, line)

    def _send(self, line: str) -> None:
        self._emit("C", _redact(line))
        try:
            self._sock.sendall(line.encode("utf-8") + b"\r\n")
        except OSError as exc:
            raise POP3ProtocolError(f"connection lost while sending: {exc}") from exc

    def _recv(self) -> bytes:
        try:
            data = self._sock.recv(RECV_SIZE)
        except TimeoutError as exc:
            raise POP3ProtocolError("timed out waiting for the server") from exc
        except OSError as exc:
            raise POP3ProtocolError(f"connection lost: {exc}") from exc
        if not data:
            raise POP3ProtocolError("server closed the connection")
        return data

    def _read_status_line(self) -> str:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                raw, self._buf = self._buf[:end], self._buf[end + 1 :]
                line = raw.rstrip(b"\r").decode("utf-8", "replace")
                self._emit("S", line)
                return line
            if len(self._buf) > MAX_STATUS_LINE:
                raise POP3ProtocolError("status line too long")
            self._buf += self._recv()

    def _status(self, command: str) -> str:
        """Send ``command`` (unless empty) and return its +OK line or raise."""
        if command:
            self._send(command)
        line = self._read_status_line()
        if line.startswith("+OK"):
            return line
        if line.startswith("-ERR"):
            raise POP3Error(line, _redact(command).split(" ")[0] or "greeting")
        raise POP3ProtocolError(f"unexpected reply: {line[:200]!r}")

    def _read_body(self, sink: Sink) -> int:
        """Stream a multi-line body into ``sink``; return the decoded octets."""
        decoder = DotUnstuffer()
        total = 0
        data, self._buf = self._buf, b""
        self.in_multiline = True
        while True:
            out = decoder.feed(data)
            if out:
                sink(out)
                total += len(out)
            if decoder.done:
                self._buf = decoder.trailing
                self.in_multiline = False
                return total
            data = self._recv()

    def send_pipelined(self, commands: Iterable[str]) -> None:
        """Send several commands in one write (RFC 2449 PIPELINING).

        Only for servers that announce PIPELINING; the replies come back in
        order and are read one by one with :meth:`next_reply`.
        """
        batch = list(commands)
        if not batch:
            return
        for command in batch:
            self._emit("C", _redact(command))
        try:
            self._sock.sendall(b"".join(c.encode("utf-8") + b"\r\n" for c in batch))
        except OSError as exc:
            raise POP3ProtocolError(f"connection lost while sending: {exc}") from exc
        self.inflight.extend(batch)

    def next_reply(self, sink: Sink | None = None) -> tuple[str, int | None]:
        """Read the reply to the oldest pipelined command (its body into ``sink``).

        Returns (status line, body octets or None); ``-ERR`` raises
        :class:`POP3Error` -- the replies still in flight then make the
        connection unusable for anything but closing it.
        """
        command = self.inflight.popleft()
        line = self._read_status_line()
        if line.startswith("+OK"):
            if expects_body(command):
                return line, self._read_body(sink or (lambda _b: None))
            return line, None
        if line.startswith("-ERR"):
            raise POP3Error(line, _redact(command).split(" ")[0])
        raise POP3ProtocolError(f"unexpected reply: {line[:200]!r}")

    @property
    def pipelining(self) -> bool:
        """Whether the server allows several commands in flight (RFC 2449 section 6.6)."""
        return self.has_capability("PIPELINING")

    def multiline(self, command: str, sink: Sink) -> tuple[str, int]:
        """Run a multi-line command, streaming its body; return (status, octets)."""
        status = self._status(command)
        return status, self._read_body(sink)

    def _lines(self, command: str) -> builtins.list[str]:
        chunks: list[bytes] = []
        self.multiline(command, chunks.append)
        text = b"".join(chunks).decode("utf-8", "replace")
        return [line for line in text.split("\r\n") if line]

    def raw(self, line: str, sink: Sink | None = None) -> tuple[str, int | None]:
        """Send a user-typed command (the shell); read a body when one follows."""
        self._send(line)
        status = self._read_status_line()
        if status.startswith("+OK") and expects_body(line):
            return status, self._read_body(sink or (lambda _b: None))
        return status, None

    # -- commands ---------------------------------------------------------------

    def capa(self) -> dict[str, list[str]] | None:
        """RFC 2449 CAPA; None when the server predates it."""
        try:
            lines = self._lines("CAPA")
        except POP3Error:
            self.capabilities = None
            return None
        self.capabilities = {}
        for line in lines:
            name, *args = line.split()
            self.capabilities[name.upper()] = args
        return self.capabilities

    def has_capability(self, name: str, arg: str | None = None) -> bool:
        """Whether CAPA listed ``name`` (and ``arg`` among its arguments)."""
        caps = self.capabilities or {}
        if name.upper() not in caps:
            return False
        return arg is None or arg.upper() in (a.upper() for a in caps[name.upper()])

    def login(self, user: str, password: str, mechanism: str = "auto") -> str:
        """Log in with ``mechanism`` or, for "auto", the best one offered (see client.sasl)."""
        chosen = sasl.choose(mechanism, self.capabilities, self.greeting, host=self._host,
                             tls=self.tls)
        self.mechanism = chosen
        if chosen == "scram-sha-256":
            try:
                return self.auth_scram(user, password)
            except POP3Error as exc:
                if mechanism == "auto":  # the right password can fail where no keys are kept
                    exc.args = (f"{exc} (if the password is right, the server may keep no "
                                "SCRAM keys for this account: try --auth plain)",)
                raise
        if chosen == "plain":
            return self.auth_plain(user, password)
        if chosen == "apop":
            timestamp = sasl.apop_timestamp(self.greeting)
            assert timestamp is not None  # choose() checked
            return self._status(f"APOP {user} {sasl.apop_digest(timestamp, password)}")
        self._status(f"USER {user}")
        return self._status(f"PASS {password}")

    def auth_plain(self, user: str, password: str) -> str:
        """SASL PLAIN (RFC 4616) with an initial response (RFC 5034 section 4)."""
        message = sasl.plain_response(user, password)
        return self.authenticate("PLAIN", message, lambda _challenge: message)

    def auth_scram(self, user: str, password: str) -> str:
        """SASL SCRAM-SHA-256; the server must prove it knows the password too."""
        scram = sasl.ScramClient(user, password)
        steps: Iterator[Callable[[bytes], bytes | None]] = iter((scram.final, scram.verify))
        verified = False

        def respond(challenge: bytes) -> bytes:
            nonlocal verified
            step = next(steps, None)
            if step is None:
                raise sasl.LoginError("SCRAM: unexpected extra challenge from the server")
            answer = step(challenge)
            if answer is None:  # verify(): RFC 5034 has no "data with success",
                verified = True  # so the server-final comes as a challenge; answer empty
                return b""
            return answer

        line = self.authenticate("SCRAM-SHA-256", scram.first(), respond)
        if not verified:
            raise sasl.LoginError("SCRAM: the server logged us in without proving it knows "
                                  "the password (no server signature); not using the session")
        return line

    def authenticate(self, mechanism: str, initial: bytes,
                     respond: Callable[[bytes], bytes | None]) -> str:
        """Run ``AUTH mechanism`` (RFC 5034): each ``+ challenge`` goes to ``respond``.

        The initial response rides on the AUTH line unless that line would
        exceed 255 octets (RFC 5034 section 4); then it answers the first,
        empty challenge.  A ``respond`` that raises :class:`sasl.LoginError`
        cancels the exchange with ``*`` and the error propagates.
        """
        token = base64.b64encode(initial).decode("ascii") or "="
        pending: str | None = None
        if len(f"AUTH {mechanism} {token}") + 2 > 255:
            self._send(f"AUTH {mechanism}")
            pending = token
        else:
            self._send(f"AUTH {mechanism} {token}")
        while True:
            line = self._read_status_line()
            if line.startswith("+OK"):
                return line
            if line.startswith("-ERR"):
                raise POP3Error(line, f"AUTH {mechanism}")
            if line != "+" and not line.startswith("+ "):
                raise POP3ProtocolError(f"unexpected reply to AUTH: {line[:200]!r}")
            if pending is not None:
                answer, pending = pending, None
            else:
                try:
                    challenge = base64.b64decode(line[2:].strip(), validate=True)
                    reply = respond(challenge)
                except (ValueError, sasl.LoginError) as exc:
                    self._send_token("*")
                    with contextlib.suppress(POP3Error, POP3ProtocolError):
                        self._read_status_line()
                    if isinstance(exc, sasl.LoginError):
                        raise
                    raise sasl.LoginError(f"bad base64 in the server's {mechanism} "
                                          "challenge") from exc
                answer = base64.b64encode(reply or b"").decode("ascii")
            self._send_token(answer)

    def _send_token(self, token: str) -> None:
        """A SASL continuation line: shown as ``********`` in traces."""
        self._emit("C", "********" if token != "*" else "*")
        try:
            self._sock.sendall(token.encode("ascii") + b"\r\n")
        except OSError as exc:
            raise POP3ProtocolError(f"connection lost while sending: {exc}") from exc

    def stat(self) -> tuple[int, int]:
        """(message count, total octets)."""
        parts = self._status("STAT").split()
        try:
            return int(parts[1]), int(parts[2])
        except (IndexError, ValueError) as exc:
            raise POP3ProtocolError(f"bad STAT reply: {' '.join(parts)}") from exc

    def list(self) -> builtins.list[tuple[int, int]]:
        """(msn, octets) for every message not marked deleted."""
        result = []
        for entry in self._entries("LIST"):
            try:
                result.append((entry.msn, int(entry.value.split()[0])))
            except (IndexError, ValueError) as exc:
                raise POP3ProtocolError(f"bad LIST line: {entry}") from exc
        return result

    def uidl(self) -> dict[int, str] | None:
        """msn -> unique id, or None when the server lacks UIDL (it is optional)."""
        try:
            return {e.msn: e.value.split()[0] for e in self._entries("UIDL") if e.value}
        except POP3Error:
            return None

    def _entries(self, command: str) -> builtins.list[ListEntry]:
        entries = []
        for line in self._lines(command):
            msn, _, value = line.partition(" ")
            try:
                entries.append(ListEntry(int(msn), value.strip()))
            except ValueError as exc:
                raise POP3ProtocolError(f"bad {command} line: {line!r}") from exc
        return entries

    def retr(self, msn: int, sink: Sink) -> int:
        """Stream message ``msn`` into ``sink``; return its octets (CRLF form)."""
        return self.multiline(f"RETR {msn}", sink)[1]

    def top(self, msn: int, lines: int, sink: Sink) -> int:
        """Stream the header and the first ``lines`` body lines of ``msn``."""
        return self.multiline(f"TOP {msn} {lines}", sink)[1]

    def retr_bytes(self, msn: int) -> bytes:
        """A whole message in memory (small messages, tests)."""
        chunks: list[bytes] = []
        self.retr(msn, chunks.append)
        return b"".join(chunks)

    def top_bytes(self, msn: int, lines: int = 0) -> bytes:
        """Headers (plus ``lines`` body lines) in memory: what ``list`` needs."""
        chunks: list[bytes] = []
        self.top(msn, lines, chunks.append)
        return b"".join(chunks)

    def dele(self, msn: int) -> str:
        """Mark ``msn`` deleted; the server removes it only at QUIT."""
        return self._status(f"DELE {msn}")

    def rset(self) -> str:
        """Unmark every message marked deleted in this session."""
        return self._status("RSET")

    def noop(self) -> str:
        """Keep the session alive."""
        return self._status("NOOP")


def expects_body(command: str) -> bool:
    """Whether a +OK reply to ``command`` is followed by a multi-line body."""
    words = command.split()
    if not words:
        return False
    verb = words[0].upper()
    if verb in {"RETR", "TOP", "CAPA"}:
        return True
    return verb in {"LIST", "UIDL"} and len(words) == 1

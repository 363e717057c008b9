"""Raw-socket test drivers: CRLF lines over a socket; POP3 by hand (exact bytes, exact replies)."""

from __future__ import annotations

import socket


class RawLines:
    """A connected socket read by CRLF lines; bytes after the last line read stay in ``buf``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffer={self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def close(self) -> None:
        self.sock.close()


class RawPop3(RawLines):
    """Speak POP3 by hand, like the seed document's telnet session."""

    def __init__(self, host: str, port: int, timeout: float = 10) -> None:
        super().__init__(socket.create_connection((host, port), timeout=timeout))
        self.greeting = self.line()

    def multiline(self) -> bytes:
        """Read until CRLF.CRLF; return everything after the first line, terminator removed."""
        first = self.line()
        assert first.startswith(b"+OK"), first
        while b"\r\n.\r\n" not in b"\r\n" + self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed inside multi-line reply")
            self.buf += chunk
        data = b"\r\n" + self.buf
        end = data.index(b"\r\n.\r\n")
        body, rest = data[2 : end + 2], data[end + 5 :]
        self.buf = rest
        return body

    def cmd(self, text: str | bytes) -> bytes:
        self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.line()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True


def unstuff(body: bytes) -> bytes:
    """Undo dot-stuffing of a multi-line body (RFC 1939 section 3)."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)

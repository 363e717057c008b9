"""Test harness: mailbag nodes behind a real HAProxy started from ``packaging/haproxy.cfg``.

The shipped config is used as it is, with only what a test must change:
addresses and ports (loopback, free ports), no chroot/user/daemon, and a
stats socket in the temp dir so the test can wait for the health checks.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.cluster import render_haproxy

from tests.conftest import MailbagServer, free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "packaging" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
PROXY_ADDRESS = "127.0.0.1"


@dataclass
class Front:
    """HAProxy's listening ports (stand-ins for 110, 995 and 24)."""

    pop3: int
    pop3s: int
    lmtp: int


def render_config(nodes: list[MailbagServer], front: Front, stats: Path) -> str:
    """The shipped config with loopback addresses for ``nodes`` (at most 3)."""
    ports = [(node.port, node.tls_port, node.lmtp_port) for node in nodes]
    return render_haproxy(SHIPPED.read_text(), ports, (front.pop3, front.pop3s, front.lmtp), stats)


class HaProxy:
    """A foreground HAProxy process for the duration of a test."""

    def __init__(self, directory: Path, nodes: list[MailbagServer]) -> None:
        self.directory = directory
        self.nodes = nodes
        self.front = Front(free_port(), free_port(), free_port())
        self.stats = directory / "admin.sock"
        self.config = directory / "haproxy.cfg"
        self.config.write_text(render_config(nodes, self.front, self.stats))
        self.log_path = directory / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: Per node port: length of the node's log when HAProxy started (for log checks).
        self.node_log_marks: dict[int, int] = {}

    def start(self) -> None:
        """Start; if a front port was taken meanwhile (``free_port`` races with the
        test's own outgoing connections), pick new ones and try again."""
        for _ in range(3):
            mark = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [HAPROXY, "-db", "-f", str(self.config)],
                    stdout=log, stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 1.0  # a bind failure exits within this
            while time.monotonic() < deadline and self.proc.poll() is None:
                time.sleep(0.05)
            if self.proc.poll() is None:
                return
            if b"cannot bind socket" not in self.log_path.read_bytes()[mark:]:
                return  # another failure: wait_up reports it with the log
            self.front = Front(free_port(), free_port(), free_port())
            self.config.write_text(render_config(self.nodes, self.front, self.stats))

    def command(self, text: str) -> str:
        """One command on the stats socket (``show stat``, ``disable server ...``)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def status(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> UP / DOWN / ... from ``show stat``."""
        result = {}
        for row in self.command("show stat").splitlines():
            fields = row.split(",")
            if len(fields) > 17 and fields[1] not in ("FRONTEND", "BACKEND", "svname"):
                result[(fields[0], fields[1])] = fields[17]
        return result

    def wait_up(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` servers are UP in every backend (health checks passed)."""
        deadline = time.monotonic() + timeout
        status: dict[tuple[str, str], str] = {}
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log_path.read_text()}")
            try:
                status = self.status()
            except OSError:
                time.sleep(0.1)
                continue
            backends = {b for b, _ in status}
            if backends and all(
                sum(1 for (b, _), s in status.items() if b == backend and s == "UP") >= count
                for backend in backends
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"health checks did not pass: {status}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

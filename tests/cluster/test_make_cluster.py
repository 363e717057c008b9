"""``make cluster`` (scripts/cluster.py): starts the whole picture, serves, and Ctrl-C stops it all.

Bounded: free ports, one run, SIGINT, then everything it started must be gone
(ports closed, temporary directory removed, database dropped).
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.pgtest import require_postgres

ROOT = Path(__file__).resolve().parents[2]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_make_cluster_starts_serves_and_stops_on_ctrl_c() -> None:
    require_postgres()
    pop3, pop3s, lmtp = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "cluster.py"), "--pop3", str(pop3),
         "--pop3s", str(pop3s), "--lmtp", str(lmtp)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "cluster: ready" in line:
                break
        assert any("cluster: ready" in line for line in lines), "".join(lines)
        root = Path(re.search(r"everything in (\S+)", "".join(lines)).group(1))  # type: ignore[union-attr]
        database = re.search(r"database (\S+) on", "".join(lines))
        # Behind HAProxy: the demo account and its sample messages, and LMTP to alice.
        deadline = time.monotonic() + 30
        while True:
            try:
                client = poplib.POP3("127.0.0.1", pop3, timeout=10)
                client.user("demo")
                client.pass_("demo")
                break
            except (poplib.error_proto, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert client.stat()[0] >= 4
        client.quit()
        with smtplib.LMTP("127.0.0.1", lmtp, timeout=10) as conn:
            assert conn.sendmail("a@example.org", ["alice"], b"Subject: hi\r\n\r\nx\r\n") == {}
        client = poplib.POP3("127.0.0.1", pop3, timeout=10)
        client.user("alice")
        client.pass_("alice")
        assert client.stat()[0] == 1
        client.quit()

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, rest = proc.communicate(timeout=90)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "cluster: stopped" in rest
        assert not root.exists()
        for port in (pop3, pop3s, lmtp):
            assert not _listening(port)
        # No node, HAProxy or private PostgreSQL left running from that directory.
        processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(root) not in processes
        if database is not None:
            from tests.pgtest import ADMIN_DSN

            listing = subprocess.run(
                ["psql", "-XAtq", ADMIN_DSN, "-c", "SELECT datname FROM pg_database"],
                capture_output=True, text=True, timeout=20,
            )
            if listing.returncode == 0:
                assert database.group(1) not in listing.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

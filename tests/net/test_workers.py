"""``server.workers`` for real: a supervisor and 2 or 4 worker processes on loopback.

Which worker served a connection is read from the log (``connect ... peer=127.0.0.1:PORT
... worker=N``), so every test can place sessions on chosen workers and check that what
must be global (maildrop lock, connection caps, login throttling) holds across them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MailbagServer, free_port, make_home
from tests.net.pop3raw import RawPop3
from tests.net.test_lmtp_client import LmtpClient

pytestmark = pytest.mark.timeout(90)


def workers_home(tmp: os.PathLike[str], workers: int, **limits: str) -> MailbagServer:
    server = make_home(tmp, workers=workers)  # type: ignore[arg-type]
    text = server.config.read_text()
    metrics_port = free_port()
    text = text.replace('[metrics]\n', f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n', 1)
    text = re.sub(r'\n(# [^\n]*\n)*listen = ""\n', "\n", text, count=1)
    for key, value in limits.items():
        text = re.sub(rf"\n{key} = [^\n]*\n", f"\n{key} = {value}\n", text, count=1)
    server.config.write_text(text)
    server.metrics_port = metrics_port  # type: ignore[attr-defined]
    return server


@pytest.fixture(params=[2, 4], ids=["2-workers", "4-workers"])
def workers_server(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[
        MailbagServer]:
    server = workers_home(tmp_path, request.param)  # type: ignore[arg-type]
    server.workers = request.param  # type: ignore[attr-defined]
    start(server)
    try:
        yield server
    finally:
        server.stop()


def start(server: MailbagServer) -> None:
    server.start()
    wait_for_log(server, "workers-ready")


def wait_for_log(server: MailbagServer, pattern: str, count: int = 1, timeout: float = 20) -> \
        list[str]:
    """Wait until ``pattern`` (a regex) matches at least ``count`` log lines; return them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log().splitlines() if re.search(pattern, line)]
        if len(lines) >= count:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} x {pattern!r} in log:\n{server.log()[-4000:]}")
        time.sleep(0.05)


def worker_of(server: MailbagServer, conn: RawPop3) -> int:
    """The worker that accepted ``conn`` (from its ``connect`` log line)."""
    port = conn.sock.getsockname()[1]
    line = wait_for_log(server, rf" connect .*peer=127\.0\.0\.1:{port} .*worker=\d+")[-1]
    match = re.search(r"worker=(\d+)", line)
    assert match is not None
    return int(match.group(1))


def worker_pids(server: MailbagServer) -> dict[int, int]:
    """Worker number -> pid of its current process (the last ``worker-started`` line wins)."""
    pids = {}
    for line in wait_for_log(server, r"worker-started"):
        number, pid = re.search(r"number=(\d+) pid=(\d+)", line).groups()  # type: ignore[union-attr]
        pids[int(number)] = int(pid)
    return pids


def one_per_worker(server: MailbagServer, workers: int, *, login_as: list[str] | None = None
                   ) -> dict[int, RawPop3]:
    """Open connections until every worker holds one (extras are closed at once)."""
    held: dict[int, RawPop3] = {}
    for _ in range(400):
        conn = RawPop3(server.host, server.port)
        number = worker_of(server, conn)
        if number in held:
            conn.cmd("QUIT")
            conn.close()
            continue
        held[number] = conn
        if len(held) == workers:
            return held
    raise AssertionError(f"connections reached only workers {sorted(held)}")


def metrics(server: MailbagServer) -> str:
    port = server.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def login(conn: RawPop3, user: str = "demo", password: str = "demo") -> bytes:
    assert conn.cmd(f"USER {user}").startswith(b"+OK")
    return conn.cmd(f"PASS {password}")


def test_sessions_land_on_every_worker(workers_server: MailbagServer) -> None:
    server, workers = workers_server, workers_server.workers  # type: ignore[attr-defined]
    held = one_per_worker(server, workers)
    for number, conn in held.items():
        assert login(conn).startswith(b"+OK"), number
        assert conn.cmd("QUIT").startswith(b"+OK")
    text = metrics(server)
    for number in range(1, workers + 1):
        match = re.search(rf'mailbag_worker_connections_total{{worker="{number}"}} (\S+)', text)
        assert match is not None and float(match.group(1)) >= 1, text
    assert f"mailbag_workers {float(workers)}" in text
    logins = re.search(r'mailbag_logins_total{mechanism="USER",result="ok"} (\S+)', text)
    assert logins is not None and float(logins.group(1)) == workers  # summed over workers
    # One log stream: every line says who wrote it.
    assert all(re.search(r" worker=(\d+|supervisor)\b", line)
               for line in server.log().splitlines() if line[:4].isdigit())


def test_maildrop_lock_in_use_across_workers(workers_server: MailbagServer) -> None:
    # RFC 1939 section 8: the maildrop is locked for the session, whichever worker serves it.
    server = workers_server
    server.deliver(b"Subject: x\r\n\r\nbody\r\n")
    held = one_per_worker(server, 2)
    (first_worker, first), (second_worker, second) = list(held.items())[:2]
    assert first_worker != second_worker
    assert login(first).startswith(b"+OK")
    assert login(second).startswith(b"-ERR [IN-USE]")
    assert first.cmd("QUIT").startswith(b"+OK")
    assert login(second).startswith(b"+OK")  # released at QUIT, seen by the other worker
    assert second.cmd("STAT").startswith(b"+OK 1 ")
    second.cmd("QUIT")


def test_connection_caps_hold_over_all_workers(tmp_path: os.PathLike[str]) -> None:
    server = workers_home(tmp_path, 2, max_connections="4", max_connections_per_ip="3")
    start(server)
    try:
        held = list(one_per_worker(server, 2).values())
        held.append(RawPop3(server.host, server.port))
        assert all(c.greeting.startswith(b"+OK") for c in held)
        refused_by = set()
        for _ in range(8):  # whichever worker takes it, the 4th from 127.0.0.1 is refused
            extra = RawPop3(server.host, server.port)
            assert extra.greeting.startswith(b"-ERR [SYS/TEMP]"), extra.greeting
            extra.close()
        for line in wait_for_log(server, r" refused .*too many connections", 8):
            refused_by.add(re.search(r"worker=(\d+)", line).group(1))  # type: ignore[union-attr]
        # Total cap (4): one more from another loopback address fits, the next does not.
        other = socket.create_connection((server.host, server.port), source_address=(
            "127.0.0.2", 0), timeout=5)
        assert other.recv(512).startswith(b"+OK")
        again = socket.create_connection((server.host, server.port), source_address=(
            "127.0.0.2", 0), timeout=5)
        assert again.recv(512).startswith(b"-ERR [SYS/TEMP]")
        again.close()
        # A place freed on one worker is free for every worker.
        held.pop().cmd("QUIT")
        time.sleep(0.3)
        fresh = RawPop3(server.host, server.port)
        assert fresh.greeting.startswith(b"+OK")
        for conn in [*held, fresh]:
            conn.cmd("QUIT")
        other.close()
    finally:
        server.stop()


def test_sighup_reloads_every_worker_with_sessions_open(workers_server: MailbagServer) -> None:
    server, workers = workers_server, workers_server.workers  # type: ignore[attr-defined]
    server.deliver(b"Subject: one\r\n\r\nbody\r\n")
    server.add_user("second", "second-pw")
    held = one_per_worker(server, workers)
    conns = list(held.values())
    assert login(conns[0]).startswith(b"+OK")
    assert login(conns[1], "second", "second-pw").startswith(b"+OK")
    server.config.write_text(server.config.read_text().replace(
        'greeting = "mailbag POP3 server ready."', 'greeting = "Reloaded."'))
    server.add_user("newbie", "newbie-pw")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    lines = wait_for_log(server, r" reloaded .*worker=\d+", workers)
    assert {re.search(r"worker=(\d+)", x).group(1) for x in lines} == {  # type: ignore[union-attr]
        str(n) for n in range(1, workers + 1)}
    for _ in range(workers * 3):  # new sessions, whichever worker: new greeting, new user
        fresh = RawPop3(server.host, server.port)
        assert fresh.greeting.startswith(b"+OK Reloaded."), fresh.greeting
        fresh.close()
    fresh = RawPop3(server.host, server.port)
    assert login(fresh, "newbie", "newbie-pw").startswith(b"+OK")
    fresh.cmd("QUIT")
    # Sessions open across the reload carry on, on every worker.
    assert conns[0].cmd("STAT").startswith(b"+OK 1 ")
    assert conns[1].cmd("STAT").startswith(b"+OK 0 ")
    for conn in conns:
        assert conn.cmd("QUIT").startswith(b"+OK")


def test_kill_9_one_worker_mid_session(workers_server: MailbagServer) -> None:
    server, workers = workers_server, workers_server.workers  # type: ignore[attr-defined]
    for i in range(3):
        server.deliver(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
    server.add_user("other", "other-pw")
    server.deliver(b"Subject: other\r\n\r\nfor other\r\n", user="other")
    held = one_per_worker(server, workers)
    (victim_worker, victim), (_, calm) = list(held.items())[:2]
    assert login(victim).startswith(b"+OK")
    for n in (1, 2, 3):
        assert victim.cmd(f"DELE {n}").startswith(b"+OK")
    assert login(calm, "other", "other-pw").startswith(b"+OK")
    pid = worker_pids(server)[victim_worker]
    os.kill(pid, signal.SIGKILL)
    assert victim.closed()
    line = wait_for_log(server, rf" worker-died number={victim_worker} pid={pid} ")[-1]
    assert "SIGKILL" in line
    wait_for_log(server, rf" worker-started number={victim_worker} ", 2)
    wait_for_log(server, rf" worker-ready .*worker={victim_worker}\b", 2)
    # The others were not disturbed.
    assert calm.cmd("STAT").startswith(b"+OK 1 ")
    calm.send(b"RETR 1\r\n")
    assert b"for other" in calm.multiline()
    # Nothing deleted, and the dead worker's maildrop lock is free.
    again = RawPop3(server.host, server.port)
    assert login(again).startswith(b"+OK")
    assert again.cmd("STAT").startswith(b"+OK 3 ")
    again.cmd("QUIT")
    assert calm.cmd("QUIT").startswith(b"+OK")
    text = metrics(server)
    assert "mailbag_worker_restarts_total 1.0" in text
    assert f"mailbag_workers {float(workers)}" in text


def test_sigterm_drains_every_worker(tmp_path: os.PathLike[str]) -> None:
    server = workers_home(tmp_path, 2, shutdown_grace="1.5")
    start(server)
    for i in range(2):
        server.deliver(b"Subject: %d\r\n\r\nbody\r\n" % i)
    server.add_user("other", "other-pw")
    server.deliver(b"Subject: other\r\n\r\nbody\r\n", user="other")
    held = one_per_worker(server, 2)
    (_, cut), (_, finishing) = list(held.items())
    assert login(cut).startswith(b"+OK")
    assert cut.cmd("DELE 1").startswith(b"+OK")  # left open: cut at the end of the grace
    assert login(finishing, "other", "other-pw").startswith(b"+OK")
    assert finishing.cmd("DELE 1").startswith(b"+OK")
    assert server.proc is not None
    pids = list(worker_pids(server).values())
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert finishing.cmd("QUIT").startswith(b"+OK")  # finishes within the grace: committed
    assert server.proc.wait(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert cut.closed()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    server.proc = None
    start(server)
    try:
        check = RawPop3(server.host, server.port)
        assert login(check).startswith(b"+OK")
        assert check.cmd("STAT").startswith(b"+OK 2 ")  # the cut session committed nothing
        check.cmd("QUIT")
        check = RawPop3(server.host, server.port)
        assert login(check, "other", "other-pw").startswith(b"+OK")
        assert check.cmd("STAT").startswith(b"+OK 0 ")  # the finished one did
        check.cmd("QUIT")
    finally:
        server.stop()
    assert "outcome=shutdown" in server.log()


def test_login_throttling_holds_over_all_workers(workers_server: MailbagServer) -> None:
    # Guesses spread over workers count as if one process had seen them all.
    server = workers_server
    held = one_per_worker(server, 2)
    (first_worker, first), (second_worker, second) = list(held.items())[:2]
    for _ in range(2):
        assert login(first, "demo", "wrong").startswith(b"-ERR [AUTH]")
    wait_for_log(server, rf" login-failed .*worker={first_worker}\b", 2)
    started = time.monotonic()
    assert login(second, "demo", "wrong").startswith(b"-ERR [AUTH]")
    # The other worker, never guessed at before, delays this attempt like the first one would.
    line = wait_for_log(server, rf" throttled .*user=demo .*worker={second_worker}\b")[-1]
    assert "peer=127.0.0.1" in line
    assert time.monotonic() - started >= 0.2 + 0.2  # the throttle delay, then the failure delay
    for conn in (first, second):
        conn.cmd("QUIT")


def test_auth_cache_is_shared_by_all_workers(workers_server: MailbagServer) -> None:
    # A password verified by one worker is a cache hit on every other: one miss in all.
    server = workers_server
    held = one_per_worker(server, server.workers)  # type: ignore[attr-defined]
    for conn in held.values():
        assert login(conn).startswith(b"+OK")
        conn.cmd("QUIT")
        conn.close()
        time.sleep(0.1)  # the entry reaches the others (one relayed message)
    wait_for_log(server, r" login .*user=demo", len(held))
    text = metrics(server)
    hits = re.search(r'mailbag_auth_cache_total\{result="hit"\} (\d+)', text)
    misses = re.search(r'mailbag_auth_cache_total\{result="miss"\} (\d+)', text)
    assert misses is not None and float(misses.group(1)) == 1, text
    assert hits is not None and float(hits.group(1)) == len(held) - 1


def test_lmtp_unix_socket_is_the_supervisors(tmp_path: os.PathLike[str]) -> None:
    # Workers serve the supervisor's Unix socket; a worker that exits must not remove the
    # file (the others and its successor still serve it); the supervisor removes it at the end.
    server = workers_home(tmp_path, 2)
    path = Path(tmp_path) / "lmtp.sock"
    text = server.config.read_text()
    server.config.write_text(text.replace('socket = ""', f'socket = "{path}"', 1))
    start(server)
    try:
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o660
        pid = worker_pids(server)[1]
        os.kill(pid, signal.SIGTERM)  # drains and exits like at shutdown: closes its listeners
        wait_for_log(server, rf" worker-died number=1 pid={pid} ")
        wait_for_log(server, r" worker-ready .*worker=1\b", 2)
        assert path.is_socket()
        before = len(server.log())
        sent = 0
        while sent < 200:  # until both workers (worker 1's successor too) have delivered
            client = LmtpClient(unix=str(path))
            assert client.lhlo()[0] == 250
            done = client.transaction("s@x", ["demo"], b"Subject: %d\r\n\r\nb\r\n" % sent)
            assert done.per_recipient[0][0] == 250
            client.close()
            sent += 1
            served = set(re.findall(r" lmtp-delivered .*worker=(\d+)", server.log()[before:]))
            if served == {"1", "2"}:
                break
        assert served == {"1", "2"}
        pop = RawPop3(server.host, server.port)
        assert login(pop).startswith(b"+OK")
        assert pop.cmd("STAT").startswith(f"+OK {sent} ".encode())
        pop.cmd("QUIT")
    finally:
        assert server.stop() == 0
    assert not path.exists()  # removed by the supervisor, which created it

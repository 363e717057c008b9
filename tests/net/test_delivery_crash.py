"""Crash tests: the delivering process SIGKILLed at random points.

Maildir's promise (cr.yp.to/proto/maildir.html): a message appears in
``new/`` only by a link of a complete, fsynced file, so a crash leaves at
most a leftover in ``tmp/``, and ``tmp/`` files untouched for 36 hours are
removed.  Kill points are drawn from a seeded RNG, so each run tries the
same spread of moments (process start-up, reading stdin, writing, fsync,
link) and a failure is reproducible.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import MailbagServer
from tests.net.pop3raw import RawPop3
from tests.net.test_delivery_concurrency import check, make_message
from tests.net.test_lmtp_client import LmtpClient


def assert_only_complete(maildir: Path) -> set[str]:
    """Every file in new/ and cur/ is a whole message; return their tags."""
    tags = set()
    for sub in ("new", "cur"):
        d = maildir / sub
        for p in d.iterdir() if d.exists() else ():
            data = p.read_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
            tags.add(check(data))
    return tags


def test_deliver_sigkill_at_random_points_leaves_no_partial_message(
    mailbag_home: MailbagServer,
) -> None:
    rng = random.Random(20331)
    delivered = set()
    for i in range(12):
        tag = f"k{i}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailbag", "deliver", "-c", str(mailbag_home.config), "demo"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None
        message = make_message(tag, 6 * 1024 * 1024)
        feeder = threading.Thread(target=_feed, args=(proc.stdin, message))
        feeder.start()
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=30)
        feeder.join(timeout=30)
        if code == 0:
            delivered.add(tag)
    tags = assert_only_complete(mailbag_home.maildir())
    print(f"killed 12 deliveries: {len(delivered)} finished, {len(tags)} stored, "
          f"{len(list((mailbag_home.maildir() / 'tmp').iterdir()))} tmp leftovers")
    assert delivered <= tags, "a delivery that reported success is missing"
    assert tags <= {f"k{i}" for i in range(12)}


def _feed(stdin: object, data: bytes) -> None:
    try:
        stdin.write(data)  # type: ignore[attr-defined]
        stdin.close()  # type: ignore[attr-defined]
    except (BrokenPipeError, ValueError, OSError):
        pass


def test_data_server_sigkill_mid_delivery_acked_messages_survive(
    mailbag_home: MailbagServer,
) -> None:
    """250 after the dot means stored durably (RFC 5321 section 6.1): a crash keeps it."""
    rng = random.Random(5321)
    acked: set[str] = set()
    for round_ in range(4):
        mailbag_home.start()
        stop = threading.Event()

        def pump(r: int = round_, stop: threading.Event = stop) -> None:
            try:
                client = LmtpClient(port=mailbag_home.lmtp_port)
                client.lhlo()
                n = 0
                while not stop.is_set():
                    tag = f"r{r}-{n}"
                    t = client.transaction("s@x", ["demo"],
                                           make_message(tag, rng.randint(1000, 2_000_000)))
                    if t.per_recipient and t.per_recipient[0][0] == 250:
                        acked.add(tag)
                    n += 1
            except (ConnectionError, OSError):
                pass

        worker = threading.Thread(target=pump)
        worker.start()
        time.sleep(rng.uniform(0.2, 1.0))
        assert mailbag_home.stop(signal.SIGKILL) == -signal.SIGKILL
        stop.set()
        worker.join(timeout=30)
    assert acked, "no delivery finished before the kills: the test proved nothing"
    tags = assert_only_complete(mailbag_home.maildir())
    assert acked <= tags


def test_tmp_leftovers_removed_by_age_on_next_open(mailbag_server: MailbagServer) -> None:
    """Maildir spec: tmp/ files not accessed for 36 hours are removed; fresh ones stay."""
    mailbag_server.deliver(b"Subject: x\n\ny\n")
    tmp = mailbag_server.maildir() / "tmp"
    old, fresh = tmp / "1.M1P1.crashed", tmp / "2.M2P2.in-progress"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    day_and_a_half_ago = time.time() - 37 * 3600
    os.utime(old, (day_and_a_half_ago, day_and_a_half_ago))
    lock = mailbag_server.maildir() / "mailbag.lock"
    if lock.exists():  # cleanup runs at most hourly; pretend the last run was long ago
        os.utime(lock, (0, 0))
    c = RawPop3(mailbag_server.host, mailbag_server.port)
    c.cmd("USER demo")
    assert c.cmd("PASS demo").startswith(b"+OK")
    c.cmd("QUIT")
    assert not old.exists() and fresh.exists()

"""Parallel LMTP deliveries while POP3 sessions read and delete on the same maildrops.

Afterwards every message that got a 250 was either retrieved-and-deleted
exactly once or is still there exactly once; no message is half-written
(each carries its own length and end marker) and nothing unacknowledged
appears.  This is the issue's "nothing lost on the way", under contention:
deliveries never take the POP3 lock, a session's snapshot is fixed at login
(RFC 1939 section 4), and deletions apply only at QUIT (section 6).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

from tests.conftest import MailbagServer
from tests.net.pop3raw import RawPop3, unstuff
from tests.net.test_lmtp_client import LmtpClient

USERS = ("u1", "u2", "u3")
SENDERS = 4
PER_SENDER = 25


def make_message(tag: str, size: int) -> bytes:
    body = (b"." + b"abcdefghij" * 7 + b"\r\n") * (size // 73 + 1)
    head = f"Subject: {tag}\r\nX-Length: {len(body)}\r\n\r\n".encode()
    return head + body + f"END {tag}\r\n".encode()


def check(message: bytes) -> str:
    """Return the tag of a complete message (after our trace headers); fail otherwise."""
    head, _, body = message.partition(b"\r\n\r\n")
    lines = [ln for ln in head.split(b"\r\n") if b": " in ln and not ln[:1].isspace()]
    fields = dict(ln.split(b": ", 1) for ln in lines)
    tag = fields[b"Subject"].decode()
    length = int(fields[b"X-Length"])
    assert body == body[:length] + f"END {tag}\r\n".encode(), f"{tag} is incomplete"
    assert len(body) == length + len(f"END {tag}\r\n"), f"{tag} is incomplete"
    return tag


def test_data_parallel_with_pop3_readers_nothing_lost_or_duplicated(
    mailbag_server: MailbagServer,
) -> None:
    for user in USERS:
        mailbag_server.add_user(user, user)
    acked: dict[str, set[str]] = {u: set() for u in USERS}
    deleted: dict[str, Counter[str]] = {u: Counter() for u in USERS}
    errors: list[str] = []
    lock = threading.Lock()
    senders_done = threading.Event()

    def sender(n: int) -> None:
        rng = random.Random(n)
        client = LmtpClient(port=mailbag_server.lmtp_port)
        client.lhlo()
        for i in range(PER_SENDER):
            tag = f"s{n}-{i}"
            rcpts = rng.sample(USERS, rng.randint(1, len(USERS)))
            t = client.transaction("s@x", rcpts, make_message(tag, rng.randint(100, 60000)))
            codes = [c for c, _ in t.per_recipient]
            if codes != [250] * len(rcpts):
                errors.append(f"{tag}: {t}")
            with lock:
                for r in rcpts:
                    acked[r].add(tag)
        client.cmd("QUIT")
        client.close()

    def reader(user: str) -> None:
        rng = random.Random(user)
        while not senders_done.is_set():
            c = RawPop3(mailbag_server.host, mailbag_server.port)
            c.cmd(f"USER {user}")
            if not c.cmd(f"PASS {user}").startswith(b"+OK"):
                c.close()  # [IN-USE] cannot happen with one reader per user, but be safe
                continue
            count = int(c.cmd("STAT").split()[1])
            marked = []
            for msn in range(1, count + 1):
                c.send(f"RETR {msn}\r\n".encode())
                tag = check(unstuff(c.multiline()))
                if rng.random() < 0.5:
                    assert c.cmd(f"DELE {msn}").startswith(b"+OK")
                    marked.append(tag)
            if c.cmd("QUIT").startswith(b"+OK"):
                deleted[user].update(marked)
            c.close()
            time.sleep(0.01)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    readers = [threading.Thread(target=reader, args=(u,)) for u in USERS]
    for t in threads + readers:
        t.start()
    for t in threads:
        t.join(timeout=120)
    senders_done.set()
    for t in readers:
        t.join(timeout=60)
    assert not errors, errors[:3]
    for user in USERS:
        c = RawPop3(mailbag_server.host, mailbag_server.port)
        c.cmd(f"USER {user}")
        assert c.cmd(f"PASS {user}").startswith(b"+OK")
        count = int(c.cmd("STAT").split()[1])
        remaining: Counter[str] = Counter()
        for msn in range(1, count + 1):
            c.send(f"RETR {msn}\r\n".encode())
            remaining[check(unstuff(c.multiline()))] += 1
        c.cmd("QUIT")
        assert max(remaining.values(), default=1) == 1, "a message is duplicated"
        assert max(deleted[user].values(), default=1) == 1, "deleted twice = duplicated"
        assert not set(remaining) & set(deleted[user])
        assert set(remaining) | set(deleted[user]) == acked[user], "lost or unexpected"
        assert deleted[user], "readers never deleted anything: the test proved nothing"

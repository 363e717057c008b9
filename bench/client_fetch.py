"""Measure ``mailbag mail fetch`` throughput against a private Dovecot and a mailbag server.

    .venv/bin/python bench/client_fetch.py [--count 1000] [--size 4096]
        [--server dovecot|mailbag|both] [--format maildir|mbox|both] [--rounds 2]

Fills a fresh mailbox on each server with COUNT messages of about SIZE
bytes, runs the real CLI (``mailbag mail fetch``) in a subprocess, and
prints messages/s and MB/s for the first fetch (everything new) and a
second one (nothing new, UIDL state only).  Every message is fsynced and
journalled as in normal use.  With several rounds, servers and formats
alternate (the machine is shared and noisy) and the median of the first
fetches is reported per combination.

``BENCH_LAUNCHER=path/to/script.py`` runs another client instead of
``python -m mailbag``; ``--compare path/to/script.py`` runs that client
("before") and this checkout ("after") back to back on fresh mailboxes of
the same server, every round, and reports the median ratio per combination
(paired samples hold up on a shared, noisy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.client.pop3servers import Dovecot, Target, dovecot_available  # noqa: E402
from tests.conftest import make_home  # noqa: E402


@contextmanager
def dovecot_server(work: Path) -> Iterator[Dovecot]:
    """The tests' private Dovecot with a trustme certificate (STLS as in real use)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(work / "cert.pem"))
    cert.private_key_pem.write_to_path(str(work / "key.pem"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    server = Dovecot(work / "cert.pem", work / "key.pem", work / "ca.pem")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class MailbagBoxes:
    """A mailbag server (as the tests start it) handing out fresh users."""

    def __init__(self, work: Path) -> None:
        self.server = make_home(work / "mailbag-home")
        self.count = 0

    def add_user(self) -> Target:
        self.count += 1
        name, password = f"bench{self.count}", f"bench-secret-{self.count}"
        self.server.add_user(name, password)
        maildir = self.server.maildir(name)
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        return Target("mailbag", "localhost", self.server.port, self.server.tls_port, name,
                      password, str(self.server.cert), maildir)


@contextmanager
def mailbag_server(work: Path) -> Iterator[MailbagBoxes]:
    boxes = MailbagBoxes(work)
    boxes.server.start()
    try:
        yield boxes
    finally:
        boxes.server.stop()


def fill(box: Target, count: int, size: int) -> None:
    line = "邮件正文 mail body text, line of about sixty characters.\r\n".encode()
    body = line * max(1, size // len(line))
    for n in range(count):
        box.deliver(f"From: a@example.cn\r\nSubject: =?utf-8?B?5rWL6K+V?= {n}\r\n"
                    f"Message-ID: <{n}@bench>\r\n\r\n".encode() + body)


def run_fetch(box: Target, dest: Path, fmt: str, show: bool,
              launcher: str | None = None) -> list[dict[str, float]]:
    """First fetch and second (nothing new) fetch; returns both JSON summaries."""
    env = dict(os.environ, MAILBAG_PASSWORD=box.password)
    launcher = launcher or os.environ.get("BENCH_LAUNCHER")
    prefix = [sys.executable, launcher] if launcher else [sys.executable, "-m", "mailbag"]
    cmd = [*prefix, "mail", "-a", box.url, "--ca", box.ca,
           "fetch", "--to", str(dest), "--format", fmt, "--json"]
    if show:
        print("$", " ".join(cmd[2:]))
    results = []
    for label in ("first fetch (all new)", "second fetch (nothing new)"):
        started = time.monotonic()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"fetch failed: {result.stderr}")
        wall = time.monotonic() - started
        data = json.loads(result.stdout)
        mb = data["octets"] / 1e6
        print(f"  {box.name:8} {fmt:7} {label}: {data['fetched']} messages, {mb:.1f} MB in "
              f"{data['seconds']:.2f} s ({wall:.2f} s wall) = "
              f"{data['fetched'] / max(data['seconds'], 1e-9):.0f} msg/s, "
              f"{mb / max(data['seconds'], 1e-9):.1f} MB/s")
        results.append(data)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096, help="approximate message size")
    parser.add_argument("--format", choices=("maildir", "mbox", "both"), default="maildir")
    parser.add_argument("--server", choices=("dovecot", "mailbag", "both"), default="dovecot")
    parser.add_argument("--rounds", type=int, default=1, help="alternating repetitions")
    parser.add_argument("--compare", metavar="LAUNCHER",
                        help="also run this client script (before) next to this checkout (after)")
    args = parser.parse_args()
    servers = ["dovecot", "mailbag"] if args.server == "both" else [args.server]
    formats = ["maildir", "mbox"] if args.format == "both" else [args.format]
    if "dovecot" in servers:
        reason = dovecot_available()
        if reason:
            print(f"skipped: {reason}", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="mailbag-bench-"))
    work.chmod(0o755)
    rates: dict[tuple[str, str, str], list[float]] = {}
    clients: list[tuple[str, str | None]] = (
        [("before", args.compare), ("after", None)] if args.compare else [("", None)])
    with ExitStack() as stack:
        makers: dict[str, Dovecot | MailbagBoxes] = {}
        if "dovecot" in servers:
            makers["dovecot"] = stack.enter_context(dovecot_server(work))
        if "mailbag" in servers:
            makers["mailbag"] = stack.enter_context(mailbag_server(work))
        run = 0
        for rnd in range(args.rounds):
            for server in servers if rnd % 2 == 0 else servers[::-1]:
                for fmt in formats:
                    order = clients if (rnd + run) % 2 == 0 else clients[::-1]
                    for label, launcher in order:
                        run += 1
                        box = makers[server].add_user()
                        fill(box, args.count, args.size)
                        dest = work / f"out{run}" / (
                            "Maildir" if fmt == "maildir" else "inbox.mbox")
                        if label:
                            print(f"  [{label}]")
                        first, _second = run_fetch(box, dest, fmt, show=run == 1,
                                                   launcher=launcher)
                        rates.setdefault((server, fmt, label), []).append(
                            first["fetched"] / max(first["seconds"], 1e-9))
    print("median msg/s of the first fetch:")
    for (server, fmt, label), values in rates.items():
        print(f"  {server:8} {fmt:7} {label:6} {statistics.median(values):6.0f}  "
              f"(runs: {', '.join(f'{v:.0f}' for v in values)})")
    if args.compare:
        print("median after/before ratio of paired runs:")
        for server in servers:
            for fmt in formats:
                pairs = zip(rates[(server, fmt, "after")], rates[(server, fmt, "before")],
                            strict=True)
                ratios = [a / b for a, b in pairs]
                print(f"  {server:8} {fmt:7} {statistics.median(ratios):5.1f}x  "
                      f"(pairs: {', '.join(f'{r:.1f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

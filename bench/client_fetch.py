"""Measure ``mailbag mail fetch`` throughput against a private Dovecot.

    .venv/bin/python bench/client_fetch.py [--count 1000] [--size 4096] [--format maildir]

Fills a fresh Dovecot mailbox with COUNT messages of about SIZE bytes, runs
the real CLI (``mailbag mail fetch``) in a subprocess, and prints messages/s
and MB/s for the first fetch (everything new) and a second one (nothing new,
UIDL state only).  Every message is fsynced and journalled as in normal use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.client.pop3servers import Dovecot, dovecot_available  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096, help="approximate message size")
    parser.add_argument("--format", choices=("maildir", "mbox"), default="maildir")
    args = parser.parse_args()
    reason = dovecot_available()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="mailbag-bench-"))
    work.chmod(0o755)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(work / "cert.pem"))
    cert.private_key_pem.write_to_path(str(work / "key.pem"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    server = Dovecot(work / "cert.pem", work / "key.pem", work / "ca.pem")
    server.start()
    try:
        box = server.add_user()
        line = "邮件正文 mail body text, line of about sixty characters.\r\n".encode()
        body = line * max(1, args.size // len(line))
        for n in range(args.count):
            box.deliver(f"From: a@example.cn\r\nSubject: =?utf-8?B?5rWL6K+V?= {n}\r\n"
                        f"Message-ID: <{n}@bench>\r\n\r\n".encode() + body)
        dest = work / ("Maildir/" if args.format == "maildir" else "inbox.mbox")
        env = dict(os.environ, MAILBAG_PASSWORD=box.password)
        launcher = os.environ.get("BENCH_LAUNCHER")
        prefix = [sys.executable, launcher] if launcher else [sys.executable, "-m", "mailbag"]
        cmd = [*prefix, "mail", "-a", box.url, "--ca", box.ca,
               "fetch", "--to", str(dest), "--format", args.format, "--json"]
        print("$", " ".join(cmd[2:]))
        for label in ("first fetch (all new)", "second fetch (nothing new)"):
            started = time.monotonic()
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            wall = time.monotonic() - started
            data = json.loads(result.stdout)
            mb = data["octets"] / 1e6
            print(f"{label}: {data['fetched']} messages, {mb:.1f} MB in {data['seconds']:.2f} s "
                  f"inside fetch ({wall:.2f} s wall incl. interpreter start) = "
                  f"{data['fetched'] / max(data['seconds'], 1e-9):.0f} msg/s, "
                  f"{mb / max(data['seconds'], 1e-9):.1f} MB/s")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

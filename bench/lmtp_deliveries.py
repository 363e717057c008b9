"""Deliveries per second over LMTP, one connection and several in parallel.

Usage:
    python bench/lmtp_deliveries.py                      # self-contained: temp home + server
    python bench/lmtp_deliveries.py --connections 1,4,16 --seconds 10 --size 4096
    python bench/lmtp_deliveries.py --port 2424 --users demo   # against a running server

Without ``--port`` it creates a throw-away home (``mailbag init``), adds
``--users-count`` accounts, starts ``python -m mailbag serve`` with an LMTP
listener on a free loopback port and stops it afterwards.  Every delivery is
real: tmp/ write, fsync, link into new/, fsync of the directory, as in
production.  Each worker holds one connection and runs MAIL/RCPT/DATA
transactions back to back (the envelope pipelined, RFC 2920), one recipient
per message, users chosen round-robin so parallel deliveries mostly hit
different Maildirs, like a real MTA's queue.  Prints deliveries/s and latency
percentiles per connection count.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


async def worker(
    host: str, port: int, users: itertools.cycle[str], message: bytes, deadline: float,
    latencies: list[float],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    await read_reply(reader)
    writer.write(b"LHLO bench.local\r\n")
    await read_reply(reader)
    data = message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    while time.monotonic() < deadline:
        start = time.monotonic()
        user = next(users)
        writer.write(f"MAIL FROM:<bench@example.org>\r\nRCPT TO:<{user}>\r\nDATA\r\n".encode())
        codes = [await read_reply(reader) for _ in range(3)]
        if codes != [250, 250, 354]:
            raise RuntimeError(f"envelope refused: {codes}")
        writer.write(data)
        code = await read_reply(reader)
        if code != 250:
            raise RuntimeError(f"delivery refused: {code}")
        latencies.append(time.monotonic() - start)
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


async def measure(
    host: str, port: int, users: list[str], message: bytes, connections: int, seconds: float
) -> list[float]:
    latencies: list[float] = []
    cycle = itertools.cycle(users)
    deadline = time.monotonic() + seconds
    await asyncio.gather(
        *(worker(host, port, cycle, message, deadline, latencies) for _ in range(connections))
    )
    return latencies


def make_message(size: int) -> bytes:
    head = b"From: bench@example.org\r\nTo: user@example.org\r\nSubject: benchmark\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n"
    return head + (line * (size // len(line) + 1))[: max(0, size - len(head))] + b"\r\n"


def start_server(home: Path, users_count: int) -> tuple[subprocess.Popen[bytes], int, list[str]]:
    """A fresh home with LMTP on a free port; returns the process, port and users."""
    from mailbag.auth.schemes import Argon2Params
    from mailbag.auth.users import UsersFile
    from mailbag.cli.init_cmd import init_home

    port, lmtp_port = free_port(), free_port()
    config = init_home(home, hostname="localhost", listen=(f"127.0.0.1:{port}",), listen_tls=())
    text = re.sub(r"(\n\[lmtp\]\n(?:#[^\n]*\n)*)listen = \[\]",
                  rf'\1listen = ["127.0.0.1:{lmtp_port}"]', config.read_text(), count=1)
    if os.geteuid() == 0:  # containers: serving as root must be asked for
        if "[process]" in text:
            text = text.replace("allow_root = false", "allow_root = true", 1)
        else:
            text += "\n[process]\nallow_root = true\n"
    config.write_text(text)
    users_file = UsersFile(home / "users", argon2_params=Argon2Params(1, 1024, 1))
    users = [f"bench{i}" for i in range(users_count)]
    for name in users:
        users_file.add(name, "bench")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbag", "serve", "-c", str(config), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", lmtp_port), timeout=0.5).close()
            return proc, lmtp_port, users
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mailbag serve exited") from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("LMTP listener did not come up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="a running server's LMTP port")
    parser.add_argument("--users", help="comma-separated recipients (with --port)")
    parser.add_argument("--users-count", type=int, default=16)
    parser.add_argument("--connections", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=4096, help="message size in octets")
    args = parser.parse_args()
    message = make_message(args.size)
    proc = None
    tmp = None
    try:
        if args.port:
            port, users = args.port, (args.users or "demo").split(",")
        else:
            tmp = tempfile.TemporaryDirectory(prefix="mailbag-bench-")
            proc, port, users = start_server(Path(tmp.name) / "home", args.users_count)
        print(f"message size {len(message)} octets, {len(users)} recipients, "
              f"{args.seconds:g} s per run, fsync on")
        for connections in (int(c) for c in args.connections.split(",")):
            lat = asyncio.run(measure(args.host, port, users, message, connections, args.seconds))
            rate = len(lat) / args.seconds
            q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [lat[0]] * 99
            print(f"{connections:3d} connection(s): {rate:8.1f} deliveries/s  "
                  f"p50 {q[49] * 1000:6.2f} ms  p99 {q[98] * 1000:6.2f} ms  ({len(lat)} total)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

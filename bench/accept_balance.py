"""Which way should N worker processes share a listening port?  A short experiment.

``python bench/accept_balance.py [--workers 2] [--seconds 4] [--concurrency 50]``

Two ways for N processes to accept on one TCP port:

* ``inherited``: one listening socket, bound by the parent and inherited by every
  worker; each worker's event loop polls it and whoever calls ``accept`` first
  gets the connection;
* ``reuseport``: one socket per worker, all bound to the same port with
  ``SO_REUSEPORT``; the kernel spreads connections by a hash of the 4-tuple.

Each worker is a uvloop process that serves a toy session (read one line, burn
CPU, answer, close).  Two loads: ``even`` (every session costs the same) and
``skewed`` (one session in ten costs 40x more, like an Argon2 login or a large
RETR next to cheap polls).  Reported per mode and load: sessions/s, latency
p50/p99 and how many sessions each worker served.  The load generator runs in
this process, on the same cores, so absolute rates are low on a small machine;
the comparison between the two modes is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

WORKER_CODE = r"""
import asyncio, os, socket, sys, time
fd, wid = int(sys.argv[1]), sys.argv[2]
def burn(us):
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
    def data_received(self, data):
        burn(int(data.strip() or b"0"))
        self.t.write(wid.encode() + b"\n")
        self.t.close()
async def main():
    sock = socket.socket(fileno=fd)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(P, sock=sock)
    await asyncio.Event().wait()
try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def listening_socket(port: int, reuseport: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def start_workers(mode: str, n: int) -> tuple[int, list[subprocess.Popen[bytes]]]:
    first = listening_socket(0, mode == "reuseport")
    port = first.getsockname()[1]
    socks = [first] + [listening_socket(port, True) for _ in range(n - 1)] if (
        mode == "reuseport") else [first] * n
    procs = []
    for wid, sock in enumerate(socks, 1):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER_CODE, str(sock.fileno()), str(wid)],
            pass_fds=[sock.fileno()],
        ))
    for sock in set(socks):
        sock.close()
    time.sleep(0.5)
    return port, procs


async def load(port: int, concurrency: int, seconds: float, skewed: bool) -> dict[str, object]:
    latencies: list[float] = []
    served: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    counter = 0

    async def client() -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            counter += 1
            cost = 8000 if skewed and counter % 10 == 0 else 200
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"%d\n" % cost)
            wid = (await reader.readline()).strip().decode()
            writer.close()
            latencies.append(time.perf_counter() - started)
            served[wid] = served.get(wid, 0) + 1

    began = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "rate": round(len(latencies) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        "per_worker": dict(sorted(served.items())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    results = []
    for load_kind in ("even", "skewed"):
        for mode in ("inherited", "reuseport"):
            port, procs = start_workers(mode, args.workers)
            try:
                result = asyncio.run(load(port, args.concurrency, args.seconds,
                                          load_kind == "skewed"))
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
            result = {"mode": mode, "load": load_kind, "workers": args.workers,
                      "loadavg": round(os.getloadavg()[0], 2), **result}
            results.append(result)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

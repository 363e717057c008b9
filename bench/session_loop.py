"""Sessions per second for a login-STAT-QUIT loop against a running POP3 server.

Usage:
    python bench/session_loop.py --port 1110 --user demo --password demo \
        --concurrency 1 --seconds 10
    python bench/session_loop.py --port 1110 --user-prefix bench --password bench \
        --concurrency 50 --seconds 10

A bounded asyncio load generator (loopback only): each worker opens a
connection, reads the greeting, sends USER/PASS/STAT/QUIT pipelined in the
order a client would, checks every reply, and starts over until the time is
up.  Prints sessions/s and latency percentiles.  Used for the figures in the
core issue's note; the side-by-side Dovecot comparison lives in bench/ too.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


async def one_session(host: str, port: int, user: str, password: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        greeting = await reader.readline()
        if not greeting.startswith(b"+OK"):
            raise RuntimeError(f"bad greeting {greeting!r}")
        for command in (f"USER {user}", f"PASS {password}", "STAT", "QUIT"):
            writer.write(command.encode() + b"\r\n")
            reply = await reader.readline()
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"{command.split()[0]}: {reply!r}")
    finally:
        writer.close()


async def worker(
    args: argparse.Namespace, number: int, deadline: float, latencies: list[float]
) -> None:
    # A maildrop is locked per session, so concurrent workers need their own
    # accounts: with --user-prefix, worker i logs in as <prefix><i>.
    user = f"{args.user_prefix}{number}" if args.user_prefix else args.user
    while True:  # at least one session each, so --seconds 0 is a warm-up pass
        start = time.perf_counter()
        await one_session(args.host, args.port, user, args.password)
        latencies.append(time.perf_counter() - start)
        if time.monotonic() >= deadline:
            break


async def measure(args: argparse.Namespace) -> dict[str, float]:
    """Run the loop for ``args.seconds``; sessions, rate and latency percentiles (ms)."""
    latencies: list[float] = []
    deadline = time.monotonic() + args.seconds
    started = time.perf_counter()
    await asyncio.gather(
        *(worker(args, i, deadline, latencies) for i in range(args.concurrency))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[max(int(len(latencies) * 0.99) - 1, 0)] if latencies else 0.0
    return {
        "sessions": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed,
        "concurrency": args.concurrency,
        "median_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "p99_ms": p99 * 1000,
    }


def describe(result: dict[str, float]) -> str:
    """One line for people."""
    return (
        f"sessions={result['sessions']} seconds={result['seconds']:.2f} "
        f"rate={result['rate']:.1f}/s concurrency={result['concurrency']} "
        f"median={result['median_ms']:.1f}ms p99={result['p99_ms']:.1f}ms"
    )


async def main_async(args: argparse.Namespace) -> None:
    print(describe(await measure(args)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1110)
    parser.add_argument("--user", default="demo")
    parser.add_argument("--password", default="demo")
    parser.add_argument("--user-prefix", help="worker i logs in as PREFIX<i> (all --password)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

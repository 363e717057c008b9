"""The benchmark's load generator: a small asyncio POP3 client, loopback only, bounded.

Run by ``bench/run.py`` in a separate process (so the orchestrator's own work
never competes with the measured server inside one event loop), one
subcommand per scenario, printing one JSON object on stdout:

``sessions``  connect, USER/PASS, STAT, UIDL, QUIT in a loop for ``--seconds``
              at ``--concurrency``; worker i logs in as ``PREFIX<i>`` because a
              maildrop is locked per session.  With ``--tls`` every connection
              is implicit TLS (POP3S, RFC 8314) with a full handshake: each
              connection gets a fresh ``SSLObject`` and no session is offered
              for resumption.
``retr``      sessions in a loop (login, STAT, RETR every message, QUIT),
              verifying each body's SHA-256 against the expected set, for
              ``--seconds``; with ``--concurrency N`` N workers do this at once,
              worker i as ``USER<i>`` (its own maildrop, as above).
``bigbox``    one session: login, STAT, UIDL of a big maildrop; time to the end
              of the UIDL listing.
``hold``      an interactive holder for the memory and capacity scenarios:
              reads commands on stdin (``grow N``, ``trickle RATE SECONDS``,
              ``check``, ``quit``) and answers each with one JSON line, so the
              orchestrator can measure the server while connections stay open.

Every client command waits for its reply before the next (no pipelining),
like common mail clients.  uvloop is used when installed, on the client too,
so the client is not the bottleneck it would be on the default loop.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import ssl
import sys
import time
from collections.abc import Sequence

#: Largest response the client accepts in one piece (a 100,000-line UIDL is ~3 MB).
READ_LIMIT = 64 * 1024 * 1024


class Pop3Failure(Exception):
    """A reply that was not what the scenario expected."""


class Client:
    """One POP3 connection with just enough protocol for the benchmark."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    #: Set by ``main`` for ``--tls``: every connection does a full TLS handshake.
    tls: ssl.SSLContext | None = None

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT,
                                                       ssl=cls.tls)
        client = cls(reader, writer)
        greeting = await reader.readline()
        if not greeting.startswith(b"+OK"):
            writer.close()
            raise Pop3Failure(f"greeting {greeting[:80]!r}")
        return client

    async def command(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        reply = await self.reader.readline()
        if not reply.startswith(b"+OK"):
            raise Pop3Failure(f"{line.split()[0].decode()}: {reply[:80]!r}")
        return reply

    async def multiline(self, line: bytes) -> bytes:
        """Send a command whose answer is multi-line; return the body, still dot-stuffed.

        Only the terminator can contain ``LF . CR LF`` (a body line "." is sent as
        ".."), so one ``readuntil`` finds the end; the empty body (the terminator
        right after the status line) is the one case that needs a look first.
        """
        await self.command(line)
        head = await self.reader.readexactly(1)
        if head == b".":
            head += await self.reader.readexactly(2)
            if head == b".\r\n":
                return b""
        body = head + await self.reader.readuntil(b"\n.\r\n")
        return body[:-3]

    async def login(self, user: str, password: str) -> None:
        await self.command(b"USER " + user.encode())
        await self.command(b"PASS " + password.encode())

    async def quit(self) -> None:
        try:
            await self.command(b"QUIT")
        finally:
            self.writer.close()

    def close(self) -> None:
        self.writer.close()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def full_session(host: str, port: int, user: str, password: str) -> int:
    """connect, USER/PASS, STAT, UIDL, QUIT; returns the number of UIDL lines."""
    client = await Client.connect(host, port)
    try:
        await client.login(user, password)
        await client.command(b"STAT")
        listing = await client.multiline(b"UIDL")
        await client.quit()
    finally:
        client.close()
    return listing.count(b"\n")


# ------------------------------------------------------------------ scenarios


def tls_client_context(cafile: str | None) -> ssl.SSLContext:
    """The client side of the TLS figures: Python's defaults, so TLS 1.3 when both can.

    With ``cafile`` (the bench's self-signed certificate) the server is
    verified like a real client would (chain and the 127.0.0.1 name);
    without it, not at all.  Nothing is cached between connections: Python
    resumes a session only when one is passed to ``wrap``, which we never do.
    """
    if cafile is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cafile)


async def run_sessions(args: argparse.Namespace) -> dict[str, object]:
    negotiated = None
    if Client.tls is not None:
        # One untimed handshake to record what was negotiated (protocol version and suite).
        probe = await Client.connect(args.host, args.port)
        ssl_object = probe.writer.get_extra_info("ssl_object")
        negotiated = f"{ssl_object.version()} {ssl_object.cipher()[0]}"
        probe.close()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + args.seconds

    async def worker(number: int) -> None:
        user = f"{args.prefix}{number}"
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                await full_session(args.host, args.port, user, args.password)
            except (OSError, Pop3Failure, asyncio.IncompleteReadError) as exc:
                errors.append(repr(exc))
                await asyncio.sleep(0.05)
                continue
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "sessions": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        **({"tls": negotiated} if negotiated else {}),
    }


def unstuff(body: bytes) -> bytes:
    """Undo dot-stuffing of a multi-line body (RFC 1939 section 3)."""
    body = body.replace(b"\r\n..", b"\r\n.")
    return body[1:] if body.startswith(b"..") else body


async def run_retr(args: argparse.Namespace) -> dict[str, object]:
    with open(args.expect, encoding="ascii") as f:
        expected = set(json.load(f))
    octets = messages = bad = sessions = 0
    deadline = time.monotonic() + args.seconds
    users = ([args.user] if args.concurrency == 1
             else [f"{args.user}{i}" for i in range(args.concurrency)])

    async def worker(user: str) -> None:
        nonlocal octets, messages, bad, sessions
        passes = 0
        while time.monotonic() < deadline:
            octets_, messages_, bad_ = await retr_session(user, deadline, passes == 0)
            octets += octets_
            messages += messages_
            bad += bad_
            passes += 1
            sessions += 1

    async def retr_session(user: str, deadline: float, first: bool) -> tuple[int, int, int]:
        """One session RETR-ing the whole maildrop (the first pass always completes)."""
        octets = messages = bad = 0
        client = await Client.connect(args.host, args.port)
        try:
            await client.login(user, args.password)
            stat = await client.command(b"STAT")
            count = int(stat.split()[1])
            if count != len(expected):
                raise Pop3Failure(f"STAT says {count}, expected {len(expected)}")
            seen = set()
            for msn in range(1, count + 1):
                body = unstuff(await client.multiline(b"RETR %d" % msn))
                octets += len(body)
                messages += 1
                digest = hashlib.sha256(body).hexdigest()
                if digest not in expected:
                    bad += 1
                seen.add(digest)
                if time.monotonic() > deadline and not first:
                    break
            else:
                if seen != expected:
                    bad += len(expected - seen)
            await client.quit()
        finally:
            client.close()
        return octets, messages, bad

    started = time.perf_counter()
    await asyncio.gather(*(worker(user) for user in users))
    elapsed = time.perf_counter() - started
    return {
        "octets": octets,
        "messages": messages,
        "seconds": elapsed,
        "mb_per_s": octets / elapsed / 1e6,
        "msgs_per_s": messages / elapsed,
        "bad": bad,
        "passes": sessions,
        "concurrency": args.concurrency,
    }


async def run_bigbox(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    client = await Client.connect(args.host, args.port)
    try:
        await client.login(args.user, args.password)
        stat = await client.command(b"STAT")
        listing = await client.multiline(b"UIDL")
        elapsed = time.perf_counter() - started
        await client.quit()
    finally:
        client.close()
    return {
        "seconds": elapsed,
        "stat": int(stat.split()[1]),
        "uidl_lines": listing.count(b"\n"),
    }


# ------------------------------------------------------------------ holder


class Holder:
    """Keeps authenticated sessions open; grows them and probes latency on request."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.clients: list[Client] = []
        self.next_user = 0

    async def grow(self, target: int) -> dict[str, object]:
        """Open and authenticate sessions until ``target`` are held (bounded parallelism)."""
        started = time.perf_counter()
        failures: list[str] = []
        gate = asyncio.Semaphore(self.args.parallel)

        async def one(user: str) -> None:
            async with gate:
                try:
                    client = await asyncio.wait_for(
                        Client.connect(self.args.host, self.args.port), 30
                    )
                except (OSError, Pop3Failure, TimeoutError) as exc:
                    failures.append(repr(exc))
                    return
                try:
                    await asyncio.wait_for(client.login(user, self.args.password), 30)
                    await asyncio.wait_for(client.command(b"STAT"), 30)
                except (OSError, Pop3Failure, TimeoutError, asyncio.IncompleteReadError) as exc:
                    failures.append(repr(exc))
                    client.close()
                    return
                self.clients.append(client)

        users = []
        while len(self.clients) + len(users) < target:
            users.append(f"{self.args.prefix}{self.next_user}")
            self.next_user += 1
        await asyncio.gather(*(one(u) for u in users))
        return {
            "held": len(self.clients),
            "failures": len(failures),
            "first_failure": failures[0] if failures else None,
            "seconds": time.perf_counter() - started,
        }

    async def check(self) -> dict[str, object]:
        """NOOP on every held session: how many are still alive."""
        gate = asyncio.Semaphore(500)

        async def alive(client: Client) -> bool:
            async with gate:
                try:
                    await asyncio.wait_for(client.command(b"NOOP"), 30)
                except (OSError, Pop3Failure, TimeoutError, asyncio.IncompleteReadError):
                    return False
                return True

        started = time.perf_counter()
        results = await asyncio.gather(*(alive(c) for c in self.clients))
        return {
            "alive": sum(results),
            "held": len(self.clients),
            "seconds": time.perf_counter() - started,
        }

    async def trickle(self, rate: float, seconds: float) -> dict[str, object]:
        """Open-loop arrivals: start a full session every 1/rate s; latency per session."""
        latencies: list[float] = []
        failures: list[str] = []
        pool = [f"{self.args.trickle_prefix}{i}" for i in range(self.args.trickle_users)]
        free = list(pool)

        async def one(user: str) -> None:
            start = time.perf_counter()
            try:
                await asyncio.wait_for(
                    full_session(self.args.host, self.args.port, user, self.args.password), 30
                )
            except (OSError, Pop3Failure, TimeoutError, asyncio.IncompleteReadError) as exc:
                failures.append(repr(exc))
                latencies.append(30.0)
            else:
                latencies.append(time.perf_counter() - start)
            finally:
                free.append(user)

        tasks = []
        started = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if not free:
                failures.append("no free trickle user (sessions piling up)")
                latencies.append(30.0)
                continue
            tasks.append(asyncio.ensure_future(one(free.pop(0))))
        await asyncio.gather(*tasks)
        return {
            "sessions": n,
            "failures": len(failures),
            "first_failure": failures[0] if failures else None,
            "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "max_ms": max(latencies, default=0.0) * 1000,
        }

    def quit(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


async def run_hold(args: argparse.Namespace) -> dict[str, object]:
    holder = Holder(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            holder.quit()
            await asyncio.sleep(0.2)
            return {"quit": True}
        if line[0] == "grow":
            result = await holder.grow(int(line[1]))
        elif line[0] == "check":
            result = await holder.check()
        elif line[0] == "trickle":
            result = await holder.trickle(float(line[1]), float(line[2]))
        else:
            result = {"error": f"unknown command {line[0]}"}
        print(json.dumps(result), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after (s)")
    parser.add_argument("--tls", action="store_true",
                        help="implicit TLS (POP3S) on --port, a full handshake per connection")
    parser.add_argument("--cafile", help="with --tls: verify the server against this certificate")
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("sessions")
    p.add_argument("--prefix", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0)
    p = sub.add_parser("retr")
    p.add_argument("--user", required=True)
    p.add_argument("--expect", required=True, help="JSON list of SHA-256 of each wire body")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=1,
                   help="N workers at once, worker i as USER<i> (1: USER itself)")
    p = sub.add_parser("bigbox")
    p.add_argument("--user", required=True)
    p = sub.add_parser("hold")
    p.add_argument("--prefix", required=True)
    p.add_argument("--parallel", type=int, default=100)
    p.add_argument("--trickle-prefix", required=True)
    p.add_argument("--trickle-users", type=int, default=50)
    args = parser.parse_args(argv)
    if args.tls:
        Client.tls = tls_client_context(args.cafile)
    runner = {
        "sessions": run_sessions,
        "retr": run_retr,
        "bigbox": run_bigbox,
        "hold": run_hold,
    }[args.scenario]

    async def bounded() -> dict[str, object]:
        # A server that stops answering must fail the run, not hang it.
        if args.scenario == "hold":
            return await runner(args)
        return await asyncio.wait_for(runner(args), args.timeout)

    try:
        import uvloop
    except ImportError:
        result = asyncio.run(bounded())
    else:
        result = uvloop.run(bounded())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

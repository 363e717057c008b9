"""Does the authentication cache make Argon2id logins as cheap as {PLAIN} ones?

Usage (about 30 s; loopback only, a private server in a temporary home):
    .venv/bin/python bench/auth_cache.py
    .venv/bin/python bench/auth_cache.py --cache-ttl 0        # the cache off: "before"
    .venv/bin/python bench/auth_cache.py --seconds 5 --reps 3 --json

Creates ``--concurrency`` users with the default Argon2id hash (64 MiB, t=3,
p=4; one hash computed once and shared, so set-up is quick) and as many with
``{PLAIN}`` passwords, starts ``mailbag serve`` with metrics on, warms up
(one login per Argon2id user, which fills the cache), then measures
login-STAT-QUIT sessions/s at ``--concurrency`` for PLAIN and Argon2id users
alternately (``bench/session_loop.py``), and reads the cache hit/miss counters
from ``/metrics``.  The target (issue 11): Argon2id >= 0.8x PLAIN.

``--cache-ttl`` is left out of the config when not given, so the same command
also measures a build that predates the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import session_loop  # noqa: E402

from mailbag.auth.schemes import hash_password  # noqa: E402

PASSWORD = "bench-password"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_home(home: Path, users: int, cache_ttl: float | None) -> tuple[Path, int, int]:
    """Config, users file and mail root; returns (config, pop3 port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    auth = ['users_file = "users"']
    if cache_ttl is not None:
        auth.append(f"cache_ttl = {cache_ttl}")
    config = home / "mailbag.toml"
    config.write_text(
        "[server]\n"
        f'listen = ["127.0.0.1:{port}"]\n'
        "[auth]\n" + "\n".join(auth) + "\n"
        "[storage]\n"
        'maildir = "mail/{user}/Maildir"\n'
        "[limits]\n"
        "max_connections_per_ip = 1000\n"
        "[metrics]\n"
        f'listen = "127.0.0.1:{metrics_port}"\n'
        + ("[process]\nallow_root = true\n" if os.geteuid() == 0 else "")
    )
    argon = hash_password(PASSWORD)  # the default scheme and cost: ARGON2ID, 64 MiB, t=3
    lines = [f"argon{i}:{argon}" for i in range(users)]
    lines += [f"plain{i}:{{PLAIN}}{PASSWORD}" for i in range(users)]
    users_file = home / "users"
    users_file.write_text("\n".join(lines) + "\n")
    users_file.chmod(0o600)
    (home / "mail").mkdir(mode=0o700, exist_ok=True)
    return config, port, metrics_port


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mailbag serve exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mailbag serve did not start listening")


def cache_counters(metrics_port: int) -> dict[str, float]:
    """``mailbag_auth_cache_total`` by result (empty for a build without the cache)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = re.findall(r'^mailbag_auth_cache_total\{result="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {result: float(value) for result, value in found}


def loop_args(port: int, prefix: str, concurrency: int, seconds: float) -> argparse.Namespace:
    return argparse.Namespace(
        host="127.0.0.1", port=port, user="", password=PASSWORD, user_prefix=prefix,
        concurrency=concurrency, seconds=seconds,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mailbag-authbench-") as tmp:
        home = Path(tmp)
        config, port, metrics_port = write_home(home, args.concurrency, args.cache_ttl)
        log = (home / "server.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailbag", "serve", "-c", str(config), "--log-level",
             "warning"],
            stdout=subprocess.DEVNULL, stderr=log,
        )
        try:
            wait_listening(port, proc)
            # Warm-up: one session per user (fills the cache and the maildrop indexes).
            for prefix in ("plain", "argon"):
                asyncio.run(session_loop.measure(loop_args(port, prefix, args.concurrency, 0)))
            before = cache_counters(metrics_port)
            runs: dict[str, list[float]] = {"plain": [], "argon": []}
            for _ in range(args.reps):
                for prefix in ("plain", "argon"):
                    result = asyncio.run(session_loop.measure(
                        loop_args(port, prefix, args.concurrency, args.seconds)))
                    runs[prefix].append(result["rate"])
                    print(f"{prefix:5}: {session_loop.describe(result)}", file=sys.stderr)
            after = cache_counters(metrics_port)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    plain = sum(runs["plain"]) / len(runs["plain"])
    argon = sum(runs["argon"]) / len(runs["argon"])
    hits = after.get("hit", 0.0) - before.get("hit", 0.0)
    misses = after.get("miss", 0.0) - before.get("miss", 0.0)
    return {
        "cache_ttl": args.cache_ttl,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "plain_rate": round(plain, 1),
        "argon_rate": round(argon, 1),
        "ratio": round(argon / plain, 3) if plain else 0.0,
        "plain_runs": [round(r, 1) for r in runs["plain"]],
        "argon_runs": [round(r, 1) for r in runs["argon"]],
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        "cache_totals": after,
        "load": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=50, help="parallel clients (50)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run (4)")
    parser.add_argument("--reps", type=int, default=2, help="PLAIN/Argon2id run pairs (2)")
    parser.add_argument("--cache-ttl", type=float, default=None,
                        help="auth.cache_ttl for the server (default: the server's default)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"PLAIN {result['plain_rate']}/s  Argon2id {result['argon_rate']}/s  "
            f"ratio {result['ratio']} (target >= 0.8)  cache hit rate "
            f"{result['cache_hit_rate']} ({result['cache_hits']:.0f} hits, "
            f"{result['cache_misses']:.0f} misses while measuring)  load {result['load']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

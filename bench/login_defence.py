"""What an attacker and the right user wait, with the default login-defence settings.

Usage (about a minute; loopback only, a private server in a temporary home):
    .venv/bin/python bench/login_defence.py
    .venv/bin/python bench/login_defence.py --failure-delay 0.3 --max-failure-delay 1.5

Scenario (issue 11): alice logs in from her usual network (127.0.0.1, i.e.
127.0.0.0/24) and bob from 127.0.1.1; then 20 wrong passwords for alice from
127.0.1.1 over 10 parallel connections.  Then, each timed from PASS to its
reply: the attacker's next guess, alice from her network, bob from the
attacking address, and alice from a network she never used (127.0.200.1).
Users have the default Argon2id hash; ``auth.cache_ttl`` stays at its default.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mailbag.auth.schemes import hash_password

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


class Client:
    """One POP3 connection from a chosen source address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60,
                                             source_address=(source, 0))
        self.buf = b""
        self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def close(self) -> None:
        self.sock.close()


def attempt(
    port: int, source: str, user: str, password: str, tries: int = 1
) -> list[tuple[bool, float]]:
    """``tries`` USER/PASS on one connection; (succeeded, seconds from PASS to reply) each."""
    client = Client(port, source)
    results = []
    try:
        for _ in range(tries):
            client.cmd(f"USER {user}")
            started = time.monotonic()
            reply = client.cmd(f"PASS {password}")
            results.append((reply.startswith(b"+OK"), round(time.monotonic() - started, 3)))
        client.cmd("QUIT")
    finally:
        client.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--failure-delay", type=float, help="auth.failure_delay (default: 2)")
    parser.add_argument("--max-failure-delay", type=float,
                        help="auth.max_failure_delay (default: 15)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailbag-defence-") as tmp:
        home = Path(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        auth = ['users_file = "users"']
        if args.failure_delay is not None:
            auth.append(f"failure_delay = {args.failure_delay}")
        if args.max_failure_delay is not None:
            auth.append(f"max_failure_delay = {args.max_failure_delay}")
        (home / "mailbag.toml").write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\n[auth]\n' + "\n".join(auth) + "\n"
            + ("[process]\nallow_root = true\n" if os.geteuid() == 0 else ""))
        (home / "users").write_text("".join(
            f"{user}:{hash_password(password)}\n" for user, password in PASSWORDS.items()))
        proc = subprocess.Popen([sys.executable, "-m", "mailbag", "serve", "-c",
                                 str(home / "mailbag.toml"), "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            result: dict[str, object] = {}
            result["alice_first_login_home"] = attempt(port, "127.0.0.1", "alice", "alice-pw")[0]
            result["bob_first_login_attacker_address"] = attempt(port, "127.0.1.1", "bob",
                                                                 "bob-pw")[0]
            started = time.monotonic()
            with ThreadPoolExecutor(10) as pool:
                guesses = [r for rs in pool.map(
                    lambda _: attempt(port, "127.0.1.1", "alice", "wrong", tries=2), range(10))
                    for r in rs]
            result["attack_20_guesses_seconds"] = round(time.monotonic() - started, 2)
            result["attack_reply_seconds"] = sorted(t for _, t in guesses)
            result["attacker_next_guess"] = attempt(port, "127.0.1.1", "alice", "wrong")[0]
            result["alice_home_network"] = attempt(port, "127.0.0.9", "alice", "alice-pw")[0]
            result["bob_from_attacker_address"] = attempt(port, "127.0.1.1", "bob", "bob-pw")[0]
            result["alice_fresh_network"] = attempt(port, "127.0.200.1", "alice", "alice-pw")[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``make cluster``: the whole scale-out picture on one machine, stopped by Ctrl-C.

    PostgreSQL  (127.0.0.1:5432 if one runs there: a fresh database in it;
                 otherwise a private server in the temporary directory)
    mailbag db init, demo users and messages (demo/demo, alice/alice)
    three `mailbag serve` nodes (storage and users in PostgreSQL, 3 s leases)
    HAProxy from packaging/haproxy.cfg (PROXY v2, leastconn, health checks)

Everything lives in one temporary directory; Ctrl-C (or SIGTERM) stops the
nodes, HAProxy and a private PostgreSQL, drops a database it created, and
removes the directory.  Run from the repository root (``make cluster``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "packaging" / "haproxy.cfg"
PG_BIN = Path(os.environ.get("MAILBAG_PG_BIN", "/usr/lib/postgresql/15/bin"))


def render_haproxy(text: str, nodes: list[tuple[int, int, int]], front: tuple[int, int, int],
                   stats: Path, log: str = "stdout format raw local0") -> str:
    """``packaging/haproxy.cfg`` for one machine: loopback nodes (pop3, pop3s, lmtp ports).

    Only addresses, ports, the process settings (no chroot/user/daemon) and
    a stats socket change; every setting that matters stays as shipped.
    """
    text = re.sub(r"(?m)^    (chroot|user|group|daemon|stats socket)\b.*\n", "", text)
    text = text.replace("log /dev/log local0", f"log {log}")
    # A development machine's file limit is lower than what 50000 connections need.
    text = text.replace("    maxconn 50000\n",
                        f"    maxconn 2000\n    stats socket {stats} mode 600 level admin\n")
    text = text.replace("bind :110", f"bind 127.0.0.1:{front[0]}")
    text = text.replace("bind :995", f"bind 127.0.0.1:{front[1]}")
    text = text.replace("bind 10.0.0.10:24", f"bind 127.0.0.1:{front[2]}")
    lines = []
    for line in text.splitlines():
        match = re.search(r"10\.0\.0\.1(\d):(\d+)", line)
        if match:
            index = int(match.group(1)) - 1
            if index >= len(nodes):
                continue
            pop3, pop3s, lmtp = nodes[index]
            port = {"110": pop3, "995": pop3s, "24": lmtp}[match.group(2)]
            line = line.replace(match.group(0), f"127.0.0.1:{port}")
            line = line.replace(" port 110", f" port {pop3}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class Cluster:
    """Start the pieces in order; ``stop`` undoes whatever was started, in reverse."""

    def __init__(self, root: Path, nodes: int, front: tuple[int, int, int],
                 private: bool = False) -> None:
        self.root = root
        self.private = private
        self.count = nodes
        self.front = front
        self._undo: list[Callable[[], None]] = []
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    # ------------------------------------------------------------ database
    def database(self) -> str:
        if listening(5432) and not self.private:
            admin = "postgresql://postgres@127.0.0.1:5432/postgres"
        else:
            admin = self._private_postgres()
        name = f"mailbag_cluster_{uuid.uuid4().hex[:8]}"
        asyncio.run(_sql(admin, f'CREATE DATABASE "{name}"'))
        self._undo.append(lambda: asyncio.run(
            _sql(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
        say(f"database {name} on {admin.rsplit('/', 1)[0]}")
        return admin.rsplit("/", 1)[0] + "/" + name

    def _private_postgres(self) -> str:
        data = self.root / "pgdata"
        run_as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        port = free_port()
        subprocess.run([*run_as, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True)
        options = f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1"
        pg_ctl = [*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data)]
        subprocess.run([*pg_ctl, "-o", options, "-l", str(self.root / "postgres.log"), "-w",
                        "start"], check=True, capture_output=True)
        self._undo.append(lambda: subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"],
                                                 capture_output=True, check=False))
        say(f"private PostgreSQL in {data} on 127.0.0.1:{port}")
        return f"postgresql://postgres@127.0.0.1:{port}/postgres"

    # --------------------------------------------------------------- nodes
    def node_homes(self, dsn: str) -> list[tuple[Path, tuple[int, int, int]]]:
        from mailbag.cli.init_cmd import init_home

        homes = []
        for i in range(1, self.count + 1):
            ports = (free_port(), free_port(), free_port())
            home = self.root / f"node{i}"
            config = init_home(home, hostname=f"node{i}", listen=(f"127.0.0.1:{ports[0]}",),
                               listen_tls=(f"127.0.0.1:{ports[1]}",))
            text = config.read_text()
            text = re.sub(r'(\n\[storage\]\n(?:#[^\n]*\n)*)backend = "maildir"',
                          r'\1backend = "postgres"', text, count=1)
            text = text.replace('backend = "file"', 'backend = "postgres"', 1)
            text = text.replace('dsn = ""', f'dsn = "{dsn}"', 1)
            text = text.replace("lease_time = 30.0", "lease_time = 3.0", 1)
            text = text.replace('node_name = ""', f'node_name = "node{i}"', 1)
            text = text.replace("trusted_proxies = []", 'trusted_proxies = ["127.0.0.1"]', 1)
            text = re.sub(r"(\n\[lmtp\]\n(?:#[^\n]*\n)*)listen = \[\]",
                          rf'\1listen = ["127.0.0.1:{ports[2]}"]', text, count=1)
            if os.geteuid() == 0:
                text = text.replace("allow_root = false", "allow_root = true")
            config.write_text(text)
            homes.append((home, ports))
        return homes

    def demo_data(self, config: Path) -> None:
        """``mailbag db init``, then the demo users and messages (as ``make run`` has)."""
        mailbag("db", "init", "-c", str(config))
        from mailbag.cli.wiring import build_store, build_users
        from mailbag.config import load_config
        from mailbag.demo_messages import sample_messages

        loaded = load_config(config)
        users = build_users(loaded)
        users.add("demo", "demo", apop_secret="demo")
        users.add("alice", "alice")
        store = build_store(loaded)

        async def deliver() -> None:
            for message in sample_messages():
                await store.deliver("demo", message)
            close = getattr(store, "close", None)
            if close is not None:
                await close()

        asyncio.run(deliver())

    def spawn(self, name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # Ctrl-C reaches us, not them
        self.procs.append((name, proc))
        self._undo.append(lambda: _terminate(proc))
        return proc

    def start(self) -> None:
        dsn = self.database()
        homes = self.node_homes(dsn)
        self.demo_data(homes[0][0] / "mailbag.toml")
        for i, (home, _ports) in enumerate(homes, 1):
            self.spawn(f"node{i}", [sys.executable, "-m", "mailbag", "serve", "-c",
                                    str(home / "mailbag.toml")], home / "server.log")
        for home, ports in homes:
            _wait(lambda p=ports[0]: listening(p), f"node {home.name}")
        cfg = self.root / "haproxy.cfg"
        stats = self.root / "haproxy.sock"
        cfg.write_text(render_haproxy(HAPROXY_CFG.read_text(), [p for _, p in homes],
                                      self.front, stats))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.spawn("haproxy", [haproxy, "-db", "-f", str(cfg)], self.root / "haproxy.log")
        _wait(lambda: listening(self.front[0]), "haproxy")

    def dead(self) -> str | None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}"
        return None

    def stop(self) -> None:
        while self._undo:
            with contextlib.suppress(Exception):
                self._undo.pop()()


async def _sql(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout:.0f} s")
        time.sleep(0.1)


def mailbag(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mailbag", *args], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mailbag {' '.join(args)}: {done.stderr.strip()}")


def say(text: str) -> None:
    print(f"cluster: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 2, 3),
                        help="mailbag nodes behind HAProxy (default 3)")
    parser.add_argument("--pop3", type=int, default=2110, help="HAProxy POP3 port (2110)")
    parser.add_argument("--pop3s", type=int, default=2995, help="HAProxy POP3S port (2995)")
    parser.add_argument("--lmtp", type=int, default=2024, help="HAProxy LMTP port (2024)")
    parser.add_argument("--private-postgres", action="store_true",
                        help="start a PostgreSQL of our own even if one runs on 5432")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mailbag-cluster-"))
    os.chmod(root, 0o755)
    cluster = Cluster(root, args.nodes, (args.pop3, args.pop3s, args.lmtp),
                      private=args.private_postgres)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        say(f"ready: {args.nodes} nodes behind HAProxy; everything in {root}\n"
            f"  POP3   telnet 127.0.0.1 {args.pop3}   (user demo / pass demo; or alice/alice)\n"
            f"  POP3S  openssl s_client -connect 127.0.0.1:{args.pop3s} (self-signed per node)\n"
            f"  LMTP   swaks --protocol LMTP --server 127.0.0.1:{args.lmtp} --to alice\n"
            f"  nodes' logs: {root}/node*/server.log   HAProxy: {root}/haproxy.log\n"
            "  Ctrl-C stops all of it")
        while not stopping:
            problem = cluster.dead()
            if problem:
                say(problem)
                return 1
            time.sleep(0.2)
        return 0
    except Exception as exc:  # a clear line, not a traceback, then clean up what started
        say(f"failed: {exc}")
        return 1
    finally:
        say("stopping")
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())

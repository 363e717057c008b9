"""Maildir vs PostgreSQL storage, side by side: ``python bench/backends.py`` (~3 min).

Needs a PostgreSQL at ``--admin-dsn`` (default 127.0.0.1:5432, trust auth, a
role that may create databases).  Everything else is private: a temporary
home, a fresh database (dropped at the end), loopback ports.

Set-up, identical for both backends by construction:

* the Maildirs are generated once (``bench/data.py``'s messages: LF line
  endings, dot-stuffed lines) with a ``{PLAIN}`` users file;
* the *maildir* server serves them as they are (``auth.backend = "file"``);
* for PostgreSQL, ``mailbag db init``, the same users added to the users
  table (same scheme, same password), then ``mailbag migrate maildir
  postgres`` copies the same Maildirs (UIDLs kept); the *postgres* server has
  ``storage.backend = auth.backend = "postgres"`` (the cluster deployment).

Figures, A/B alternated (maildir then postgres, ``--reps`` pairs), each run
``--seconds`` long, by ``bench/load.py`` in its own process:

* sessions/s, login-STAT-UIDL-QUIT, PLAIN users, c=1 and c=50;
* RETR MB/s of a 10 KB and of a 1 MiB maildrop (every body's SHA-256 checked);
* database connections (``pg_stat_activity`` for the database) while 1,000
  idle authenticated sessions are held on one postgres node;
* with ``--bigbox N`` (e.g. 100000): login + STAT + UIDL of an N-message
  maildrop (``bench/data.py``'s big box, migrated like the rest), time to
  the end of the UIDL listing; Maildir both *cold* (no ``mailbag.index``,
  every unsized file read) and *warm* (indexed), PostgreSQL once per rep (it
  has no cold case: the message list is one indexed query every time);
* with ``--nodes``: sessions/s at c=50 through HAProxy
  (``packaging/haproxy.cfg`` rendered by ``scripts/cluster.py``) to one node
  vs two nodes on the same database, also alternated.

Ratios are per A/B pair (postgres over maildir), reported as median and
min-max.  Prints one JSON object (``--json``) or a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "scripts"))

import data  # noqa: E402
import servers  # noqa: E402

LOAD = HERE / "load.py"
SESSION_USERS = 51
HOLD_USERS = 1000
RETR_SMALL = 300
RETR_LARGE = 16


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def dsn_for(admin: str, database: str) -> str:
    return urlunsplit(urlsplit(admin)._replace(path="/" + database))


def admin_sql(admin: str, sql: str, *args: Any) -> Any:
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(admin, timeout=5)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


# ------------------------------------------------------------------ set-up


def make_mail(root: Path) -> dict[str, Path]:
    """The Maildirs and users file both backends get; returns useful paths."""
    mail = root / "mail"
    users: list[str] = []
    for i in range(SESSION_USERS):
        data.write_box(mail, f"splain{i}", [1500 + 300 * k for k in range(10)])
        users.append(f"splain{i}")
    for i in range(HOLD_USERS):
        data.write_box(mail, f"hold{i}", [1200, 2400])
        users.append(f"hold{i}")
    small = data.write_box(mail, "retrsmall", [10_000 + 17 * k for k in range(RETR_SMALL)])
    large = data.write_box(mail, "retrlarge", [1_048_576 + 311 * k for k in range(RETR_LARGE)])
    users += ["retrsmall", "retrlarge"]
    paths = {"mail": mail, "users": root / "users", "expect_small": root / "expect-small.json",
             "expect_large": root / "expect-large.json"}
    paths["expect_small"].write_text(json.dumps(small))
    paths["expect_large"].write_text(json.dumps(large))
    paths["users"].write_text("".join(f"{u}:{{PLAIN}}{data.PASSWORD}\n" for u in users))
    paths["users"].chmod(0o600)
    return paths


def config_text(port: int, paths: dict[str, Path], *, storage: str, auth: str, dsn: str,
                node: str = "bench", proxied: bool = False) -> str:
    root = "\n[process]\nallow_root = true\n" if os.geteuid() == 0 else ""
    proxies = '["127.0.0.1"]' if proxied else "[]"
    return f"""\
[server]
hostname = "{node}"
listen = ["127.0.0.1:{port}"]
listen_tls = []
trusted_proxies = {proxies}

[storage]
backend = "{storage}"
maildir = "{paths['mail']}/{{user}}"

[auth]
backend = "{auth}"
users_file = "{paths['users']}"

[database]
dsn = "{dsn}"
node_name = "{node}"

[limits]
max_connections = 3000
max_connections_per_ip = 3000

[log]
level = "info"
{root}"""


class Node(servers.Server):
    """``mailbag serve`` with a given config text (its port chosen by Server)."""

    def __init__(self, home: Path, name: str, make: Callable[[int], str]) -> None:
        self.name = name
        home.mkdir(parents=True, exist_ok=True)
        super().__init__(home)
        self.config = home / "mailbag.toml"
        self.config.write_text(make(self.port))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mailbag", "serve", "-c", str(self.config)]


class Haproxy(servers.Server):
    name = "haproxy"

    def __init__(self, home: Path, nodes: list[int]) -> None:
        from cluster import HAPROXY_CFG, render_haproxy

        home.mkdir(parents=True, exist_ok=True)
        super().__init__(home)
        self.config = home / "haproxy.cfg"
        front = (self.port, servers.free_port(), servers.free_port())
        # pop3s/lmtp ports unused here: point them at the pop3 port (never connected).
        self.config.write_text(render_haproxy(HAPROXY_CFG.read_text(),
                                              [(p, p, p) for p in nodes], front,
                                              home / "stats.sock",
                                              log="stderr format raw local0 err"))

    def command(self) -> list[str]:
        return [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(self.config)]


def mailbag(*argv: str) -> None:
    out = subprocess.run([sys.executable, "-m", "mailbag", *argv], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"mailbag {' '.join(argv)}: {out.stdout[-1500:]}{out.stderr[-1500:]}")


def load_postgres(home: Path, paths: dict[str, Path], dsn: str) -> float:
    """db init, the same users, migrate the same Maildirs; returns the seconds it took."""
    started = time.perf_counter()
    pg_conf = home / "setup-pg.toml"
    pg_conf.write_text(config_text(0, paths, storage="postgres", auth="postgres", dsn=dsn))
    mailbag("db", "init", "-c", str(pg_conf))
    from mailbag.cli.wiring import build_users
    from mailbag.config import load_config

    users = build_users(load_config(pg_conf))
    for line in paths["users"].read_text().splitlines():
        name = line.split(":", 1)[0]
        users.add(name, data.PASSWORD, scheme="PLAIN", with_scram=False)
    # Source maildir, target postgres; the users come from the file (same names).
    mig_conf = home / "setup-migrate.toml"
    mig_conf.write_text(config_text(0, paths, storage="maildir", auth="file", dsn=dsn))
    mailbag("migrate", "maildir", "postgres", "-c", str(mig_conf), "-q")
    return time.perf_counter() - started


# ------------------------------------------------------------------ running


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def run_load(port: int, *scenario: str) -> dict[str, Any]:
    cmd = [sys.executable, str(LOAD), "--port", str(port), "--password", data.PASSWORD,
           *scenario]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load {scenario} on port {port} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = loadavg()
    return result


def figure(result: dict[str, Any]) -> float:
    return float(result.get("rate", result.get("mb_per_s", 0.0)))


def alternate(ports: dict[str, int], reps: int, scenario: list[str],
              label: str) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ports}
    for port in ports.values():  # prime: indexes, page cache, auth cache (untimed)
        run_load(port, *prime(scenario))
    for rep in range(reps):
        for name, port in ports.items():
            result = run_load(port, *scenario)
            runs[name].append(result)
            bad = result.get("errors") or result.get("bad") or 0
            why = f" ERRORS {bad} {result.get('first_error')}" if bad else ""
            log(f"  {label} rep {rep + 1}/{reps} {name}: {figure(result):.1f}{why}"
                f" (load {result['load']})")
    a, b = list(ports)
    pairs = [figure(y) / figure(x) for x, y in zip(runs[a], runs[b], strict=True)
             if figure(x)]
    return {
        a: [round(figure(r), 2) for r in runs[a]],
        b: [round(figure(r), 2) for r in runs[b]],
        "ratio": round(statistics.median(pairs), 3) if pairs else None,
        "ratio_min": round(min(pairs), 3) if pairs else None,
        "ratio_max": round(max(pairs), 3) if pairs else None,
        "errors": sum(int(r.get("errors") or r.get("bad") or 0)
                      for rs in runs.values() for r in rs),
        "raw": runs,
    }


def bigbox(ports: dict[str, int], reps: int, maildir: Path) -> dict[str, Any]:
    """Seconds to the end of UIDL: Maildir cold and warm, PostgreSQL, per rep.

    Ratios are PostgreSQL over Maildir *warm* (the state a maildrop is in
    after its first session) and over Maildir cold; lower is better.
    """
    index = maildir / "mailbag.index"
    runs: dict[str, list[float]] = {"maildir cold": [], "maildir warm": [], "postgres": []}
    run_load(ports["postgres"], "bigbox", "--user", "big")  # prime PostgreSQL's cache
    for rep in range(reps):
        index.unlink(missing_ok=True)
        for name, port in (("maildir cold", ports["maildir"]),
                           ("maildir warm", ports["maildir"]),
                           ("postgres", ports["postgres"])):
            result = run_load(port, "bigbox", "--user", "big")
            runs[name].append(round(float(result["seconds"]), 3))
            log(f"  bigbox rep {rep + 1}/{reps} {name}: {result['seconds']:.3f} s "
                f"({result['uidl_lines']} UIDL lines, load {result['load']})")

    def ratios(base: str) -> dict[str, float]:
        pairs = [pg / m for pg, m in zip(runs["postgres"], runs[base], strict=True) if m]
        return {"ratio": round(statistics.median(pairs), 3), "ratio_min": round(min(pairs), 3),
                "ratio_max": round(max(pairs), 3)}

    return {**runs, "vs_warm": ratios("maildir warm"), "vs_cold": ratios("maildir cold")}


def prime(scenario: list[str]) -> list[str]:
    out = list(scenario)
    out[out.index("--seconds") + 1] = "1"
    return out


@contextlib.contextmanager
def holder(port: int) -> Iterator[Callable[[str], dict[str, Any]]]:
    cmd = [sys.executable, str(LOAD), "--port", str(port), "--password", data.PASSWORD,
           "hold", "--prefix", "hold", "--trickle-prefix", "splain", "--parallel", "50"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    json.loads(stdout.readline())

    def ask(line: str) -> dict[str, Any]:
        stdin.write(line + "\n")
        stdin.flush()
        return dict(json.loads(stdout.readline()))

    try:
        yield ask
    finally:
        with contextlib.suppress(OSError):
            stdin.write("quit\n")
            stdin.flush()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connections(admin: str, database: str) -> int:
    return int(admin_sql(admin, "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                         database))


def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    database = f"mailbag_bench_{uuid.uuid4().hex[:8]}"
    dsn = dsn_for(args.admin_dsn, database)
    started = time.monotonic()
    result: dict[str, Any] = {"database": database, "reps": args.reps,
                              "seconds": args.seconds, "load_start": loadavg()}
    procs: list[servers.Server] = []
    with tempfile.TemporaryDirectory(prefix="mailbag-backends-") as tmp:
        home = Path(tmp)
        admin_sql(args.admin_dsn, f'CREATE DATABASE "{database}"')
        try:
            log("generating Maildirs")
            paths = make_mail(home)
            if args.bigbox:
                log(f"generating a {args.bigbox:,}-message maildrop")
                data.write_big_box(paths["mail"], "big", args.bigbox)
                with paths["users"].open("a") as users:
                    users.write(f"big:{{PLAIN}}{data.PASSWORD}\n")
            log("PostgreSQL: db init, users, migrate maildir postgres")
            result["pg_setup_seconds"] = round(load_postgres(home, paths, dsn), 1)

            def node(name: str, storage: str, proxied: bool = False) -> Node:
                auth = "postgres" if storage == "postgres" else "file"
                made = Node(home / name, name, lambda port: config_text(
                    port, paths, storage=storage, auth=auth, dsn=dsn, node=name,
                    proxied=proxied))
                made.start()
                procs.append(made)
                return made

            maildir, postgres = node("maildir", "maildir"), node("postgres", "postgres")
            ports = {"maildir": maildir.port, "postgres": postgres.port}
            seconds = str(args.seconds)
            for c in (1, 50):
                log(f"sessions c={c}")
                result[f"sessions_c{c}"] = alternate(ports, args.reps, [
                    "sessions", "--prefix", "splain", "--concurrency", str(c),
                    "--seconds", seconds], f"c={c}")
            for label, user, expect in (("10KB", "retrsmall", "expect_small"),
                                        ("1MiB", "retrlarge", "expect_large")):
                log(f"retr {label}")
                result[f"retr_{label}"] = alternate(ports, args.reps, [
                    "retr", "--user", user, "--expect", str(paths[expect]),
                    "--seconds", seconds], label)
            if args.bigbox:
                log(f"bigbox: login, STAT, UIDL of {args.bigbox:,} messages")
                result["bigbox"] = bigbox(ports, args.reps, paths["mail"] / "big")
            log(f"holding {HOLD_USERS} idle sessions on the postgres node")
            before = connections(args.admin_dsn, database)
            with holder(postgres.port) as ask:
                grown = ask(f"grow {HOLD_USERS}")
                time.sleep(1)
                held = connections(args.admin_dsn, database)
                alive = ask("check")
                after_check = connections(args.admin_dsn, database)
            result["idle"] = {"sessions": grown["held"], "failures": grown["failures"],
                              "alive": alive["alive"], "connections_before": before,
                              "connections_held": held,
                              "connections_after_noop_all": after_check,
                              "pool_max_size": 10, "load": loadavg()}
            log(f"  {result['idle']}")
            if args.nodes:
                for server in (maildir, postgres):
                    server.stop()
                procs.clear()
                a, b = node("node1", "postgres", True), node("node2", "postgres", True)
                one = Haproxy(home / "haproxy1", [a.port])
                two = Haproxy(home / "haproxy2", [a.port, b.port])
                for proxy in (one, two):
                    proxy.start()
                    procs.append(proxy)
                time.sleep(2.5)  # health checks mark the servers up (rise 2, inter 2 s)
                log("sessions c=50 through HAProxy: 1 node vs 2 nodes")
                result["nodes_c50"] = alternate(
                    {"1 node": one.port, "2 nodes": two.port}, args.reps,
                    ["sessions", "--prefix", "splain", "--concurrency", "50",
                     "--seconds", seconds], "nodes")
        finally:
            for server in reversed(procs):
                server.stop()
            with contextlib.suppress(Exception):
                admin_sql(args.admin_dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    result["load_end"] = loadavg()
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-dsn", default=os.environ.get(
        "MAILBAG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a role that may create databases (default: postgres@127.0.0.1:5432)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run (5)")
    parser.add_argument("--reps", type=int, default=2, help="A/B pairs per figure (2)")
    parser.add_argument("--nodes", action="store_true",
                        help="also 1 vs 2 postgres nodes behind HAProxy (c=50 sessions)")
    parser.add_argument("--bigbox", type=int, default=0, metavar="N",
                        help="also open an N-message maildrop (e.g. 100000; generating and "
                        "migrating it adds about a minute per 25,000 messages)")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    for key in ("sessions_c1", "sessions_c50", "retr_10KB", "retr_1MiB", "nodes_c50"):
        if key in result:
            r = result[key]
            print(f"{key:13} ratio {r['ratio']} ({r['ratio_min']}-{r['ratio_max']})  "
                  + "  ".join(f"{k}={v}" for k, v in r.items() if isinstance(v, list))
                  + f"  errors {r['errors']}")
    if "bigbox" in result:
        b = result["bigbox"]
        print("bigbox seconds:", {k: v for k, v in b.items() if isinstance(v, list)},
              " postgres/maildir warm", b["vs_warm"], " postgres/maildir cold", b["vs_cold"])
    print("idle:", result["idle"])
    print("load", result["load_start"], "->", result["load_end"], " wall",
          result["wall_seconds"], "s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

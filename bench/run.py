"""mailbag vs Dovecot, side by side: ``python bench/run.py`` (or ``make bench``).

One command on a fresh machine: installs Dovecot (apt-get) and the chart
library (pip, into the running interpreter's environment) if missing,
creates the shared Maildir data, starts a private Dovecot and a mailbag
server on loopback ports, runs every scenario against each server
alternately (A B A B ...), and writes ``docs/benchmarks.md`` (results
section) plus one PNG chart per scenario in ``docs/benchmarks/``.

Dovecot runs in four variants at once (process per session or reused
processes, ``pop3_lock_session`` no or yes; ``servers.DOVECOT_VARIANTS``);
each rep runs mailbag and then every variant, and the report compares
mailbag against the fastest variant of each figure (the others beside it).

Scenarios (see docs/benchmarks.md for the why of each):
  sessions  connect-USER/PASS-STAT-UIDL-QUIT per second at concurrency 1 and 50,
            with PLAIN and with ARGON2ID passwords on both servers, and with PLAIN
            over implicit TLS (POP3S, a full handshake per session; tls-c1, tls-c50);
  retr      RETR MB/s and messages/s for ~10 KB and ~1 MiB messages, bytes verified:
            one session (10KB, 1MiB) and 8 accounts at once (10KB-c8, 1MiB-c8, and
            mix-c8, a realistic mix of sizes);
  bigbox    a 100,000-message maildrop: first session STAT+UIDL without index, then warm;
  memory    server RSS/PSS per idle authenticated connection at 1,000 connections;
  capacity  most concurrent authenticated sessions held while a trickle of new
            sessions still completes under 1 s at p99 (aim 10,000).

By default mailbag runs twice side by side (``--mailbag-workers 1,2``:
``server.workers = 1`` and ``= 2``, named ``mailbag`` and ``mailbag-w2``) in the same
A B C rotation; the report shows each against the fastest Dovecot variant and
w2 against w1 for sessions and RETR (issue 14); bigbox, memory and capacity run
the first only.  ``--mailbag-workers 1`` is the one-mailbag run of before.

Bounded: the full run takes about 25 minutes on the 2-core machine (capacity
about 4 of them), ``--quick`` about 10 (plus a one-time data setup of under a
minute, reused afterwards).  Run it as root
(Dovecot's private instance needs to switch users), on an otherwise quiet
machine; the load average is recorded with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402

LOAD = HERE / "load.py"
#: Seconds per run of each sessions figure family (full run; ``--quick``: 2.5 times less).
#: TLS is shorter than PLAIN to keep ``make bench`` under ~25 minutes with two
#: mailbag variants and four Dovecot variants (see docs/benchmarks.md).
SESSION_SECONDS = {"plain": 5.0, "argon": 10.0, "tls": 2.5}
#: Figures added for issues 14 and 15; they run ``--reps-new`` reps (default 2), so
#: that ``make bench`` with two mailbag variants stays near 25 minutes.
NEW_FIGURES = ("tls-c1", "tls-c50", "10KB-c8", "1MiB-c8", "mix-c8")


def log(*parts: object) -> None:
    """Progress on stderr, so the run can be followed."""
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def ensure_python_deps() -> None:
    """matplotlib (charts) and uvloop (load generator, mailbag's [fast] extra) if missing."""
    missing = [m for m in ("matplotlib", "uvloop") if importlib.util.find_spec(m) is None]
    if missing:
        log("pip install", *missing)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children (both servers, the client) inherit it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def mem_available_kib() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dovecot = subprocess.run([servers.DOVECOT, "--version"], capture_output=True, text=True)
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "dovecot": dovecot.stdout.strip(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


class Bench:
    """Runs the scenarios and collects raw figures."""

    def __init__(self, args: argparse.Namespace, srv: dict[str, servers.Server],
                 paths: dict[str, Path], layout: data.Layout) -> None:
        self.args = args
        self.srv = srv
        self.paths = paths
        self.layout = layout
        self.results: dict[str, Any] = {}
        self.names = list(srv)  # mailbag first (then mailbag-w2, ...), then the Dovecot variants
        #: bigbox and memory: the first mailbag variant and Dovecot (the report shows no more).
        self.first_and_dovecots = [self.names[0], *(n for n in self.names
                                                    if not n.startswith("mailbag"))]
        self.figures = set(args.figures.split(",")) if args.figures else None

    def reps(self, figure: str) -> int:
        """Reps of one figure: ``--reps``, or ``--reps-new`` for the newer figures."""
        return self.args.reps_new if figure in NEW_FIGURES else self.args.reps

    def wanted(self, figure: str) -> bool:
        """``--figures`` selects single figures (e.g. ``plain-c50,10KB``); default all."""
        return self.figures is None or figure in self.figures

    def load(self, name: str, *scenario: str, timeout: float = 600,
             tls: bool = False) -> dict[str, Any]:
        """Run one load-generator subprocess against server ``name``; its JSON result.

        Also records the CPU time the server's process tree used meanwhile
        (``server_cpu_s``): on a shared machine the rate moves with the
        neighbours' load, CPU per unit of work much less.  ``tls``: against
        the server's POP3S port, verifying the bench's certificate.
        """
        server = self.srv[name]
        port = server.tls_port if tls else server.port
        if port is None:
            raise RuntimeError(f"{name} has no TLS listener")
        cmd = [sys.executable, str(LOAD), "--port", str(port), "--password", data.PASSWORD,
               *(["--tls", "--cafile", str(self.paths["tls_cert"])] if tls else []), *scenario]
        cpu_before = self.srv[name].cpu_seconds()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        cpu = self.srv[name].cpu_seconds() - cpu_before
        if out.returncode != 0:
            raise RuntimeError(f"load {scenario} on {name} failed: {out.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        result["load"] = loadavg()
        result["server_cpu_s"] = cpu
        if result.get("sessions"):
            result["cpu_ms_per_session"] = cpu * 1000 / result["sessions"]
        return result

    def alternate(self, reps: int, run: Callable[[str], dict[str, Any]],
                  names: list[str] | None = None) -> dict[str, list[Any]]:
        """A B C ... per rep: mailbag, then each Dovecot variant (reversed every other rep).

        Reversing spreads the distance between mailbag's run and each
        variant's evenly over the reps, so no variant is always the one
        measured furthest from mailbag's run.
        """
        names = names or self.names
        runs: dict[str, list[Any]] = {name: [] for name in names}
        for rep in range(reps):
            others = names[1:] if rep % 2 == 0 else names[:0:-1]
            for name in [names[0], *others]:
                result = run(name)
                runs[name].append(result)
                log(f"  rep {rep + 1}/{reps} {name}: {compact(result)}")
        return runs

    # ---------------------------------------------------------------- scenarios

    def sessions(self) -> None:
        """connect-login-STAT-UIDL-QUIT per second: PLAIN, ARGON2ID, and PLAIN over POP3S.

        The TLS family (``tls-c1``, ``tls-c50``) logs in as the PLAIN users,
        so it differs from ``plain-c*`` only by the implicit-TLS handshake
        (a full one per session, no resumption) and the encrypted records.
        """
        out: dict[str, Any] = {}
        primed: set[str] = set()
        for family in ("plain", "argon", "tls"):
            if not any(self.wanted(f"{family}-c{c}") for c in (1, 50)):
                continue
            tls = family == "tls"
            prefix = "splain" if tls else f"s{family}"
            seconds = SESSION_SECONDS[family] / (2.5 if self.args.quick else 1)
            if prefix not in primed:
                primed.add(prefix)
                for name in self.names:  # prime every server's indexes for these users (untimed)
                    self.load(name, "sessions", "--prefix", prefix, "--concurrency",
                              str(self.layout.session_users), "--seconds", "1.5")
            for concurrency in (1, 50):
                key = f"{family}-c{concurrency}"
                if not self.wanted(key):
                    continue
                log(f"sessions {key}")
                argv = ["sessions", "--prefix", prefix, "--concurrency",
                        str(concurrency), "--seconds", f"{seconds:g}"]
                out[key] = self.alternate(self.reps(key),
                                          lambda name, a=argv, t=tls: self.load(name, *a, tls=t))
        self.results["sessions"] = out

    #: (figure, account or account prefix, expected digests, concurrency, full-run seconds).
    #: Every worker's first pass always completes (so every message is verified at least
    #: once): ~3 MB per worker for 10KB, ~50 MB for 1MiB (8 x 50 MB take 2-3 s here,
    #: hence 4 s), ~7.5 MB for the mix; 2 s is several passes of the two small ones.
    RETR_FIGURES = (
        ("10KB", "retrsmall", "expect_small", 1, 6.0),
        ("1MiB", "retrlarge", "expect_large", 1, 6.0),
        ("10KB-c8", "retrsmall", "expect_retrsmall_c", data.RETR_CONCURRENCY, 2.0),
        ("1MiB-c8", "retrlarge", "expect_retrlarge_c", data.RETR_CONCURRENCY, 4.0),
        ("mix-c8", "retrmix", "expect_retrmix_c", data.RETR_CONCURRENCY, 2.0),
    )

    def retr(self) -> None:
        """RETR throughput, bytes verified: one session (c=1), or 8 accounts at once (c=8).

        At c=8 each of the load generator's 8 workers loops whole sessions
        (login, STAT, RETR every message, QUIT) on its own account
        (``<prefix>0..7``, hard links of the same files, so the page cache
        holds one copy).
        """
        out: dict[str, Any] = {}
        for label, user, expect, concurrency, full in self.RETR_FIGURES:
            if not self.wanted(label):
                continue
            seconds = full / 2 if self.args.quick else full
            if concurrency == 1:
                for name in self.names:  # first pass primes indexes and the page cache
                    self.load(name, "retr", "--user", user, "--expect", str(self.paths[expect]),
                              "--seconds", "0.5")
            else:
                # Indexes of all 8 accounts with STAT+UIDL (a RETR pass of 8 x 50 MB per
                # server would cost more than the figure); the files' pages by reading them.
                warm_page_cache(self.paths["mail"] / f"{user}0")
                for name in self.names:
                    self.load(name, "sessions", "--prefix", user, "--concurrency",
                              str(concurrency), "--seconds", "0.2")
            log(f"retr {label}")
            argv = ["retr", "--user", user, "--expect", str(self.paths[expect]),
                    "--concurrency", str(concurrency), "--seconds", f"{seconds:g}"]
            out[label] = self.alternate(self.reps(label),
                                        lambda name, a=argv: self.load(name, *a))
        self.results["retr"] = out

    def _drop_index(self, name: str) -> None:
        box = self.paths["mail"] / "big"
        pattern = "mailbag.index" if name.startswith("mailbag") else "dovecot*"
        for path in glob.glob(str(box / pattern)):
            if os.path.isfile(path):
                os.unlink(path)

    def bigbox(self) -> None:
        log("bigbox: priming (untimed; Dovecot moves new/ to cur/ on its first session)")
        for name in self.first_and_dovecots:
            self.load(name, "bigbox", "--user", "big")

        def run(name: str) -> dict[str, Any]:
            self._drop_index(name)
            warm_page_cache(self.paths["mail"] / "big")
            cold = self.load(name, "bigbox", "--user", "big")
            warm = self.load(name, "bigbox", "--user", "big")
            return {"cold": cold["seconds"], "warm": warm["seconds"], "stat": cold["stat"],
                    "uidl_lines": warm["uidl_lines"], "load": warm["load"]}

        log("bigbox")
        self.results["bigbox"] = self.alternate(1 if self.args.quick else self.args.reps, run,
                                                self.first_and_dovecots)

    @contextlib.contextmanager
    def holder(self, name: str) -> Iterator[Callable[[str], dict[str, Any]]]:
        """A ``load.py hold`` subprocess driven line by line."""
        cmd = [sys.executable, str(LOAD), "--port", str(self.srv[name].port),
               "--password", data.PASSWORD, "hold", "--prefix", "hold",
               "--trickle-prefix", "trickle", "--trickle-users",
               str(self.layout.trickle_users)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        json.loads(stdout.readline())

        def ask(line: str) -> dict[str, Any]:
            stdin.write(line + "\n")
            stdin.flush()
            reply = stdout.readline()
            if not reply:
                raise RuntimeError(f"holder died during {line!r}")
            return dict(json.loads(reply))

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

    def _settle(self, name: str, processes: int) -> None:
        """After a holder exits, wait (bounded) for Dovecot's per-session processes to go."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(self.srv[name].pids()) > processes + 2:
            time.sleep(0.5)

    def memory(self) -> None:
        count = 1000

        def run(name: str) -> dict[str, Any]:
            # A fresh server: earlier scenarios (a 100,000-message listing) grow a
            # heap that is not given back, which would be charged to connections.
            server = self.srv[name]
            server.stop()
            server.start()
            self.load(name, "sessions", "--prefix", "splain", "--seconds", "0.5")
            before = server.memory()
            with self.holder(name) as ask:
                grown = ask(f"grow {count}")
                alive = ask("check")
                time.sleep(1.0)
                during = server.memory()
            self._settle(name, int(before["processes"]))
            return {
                "held": grown["held"], "alive": alive["alive"],
                "before": before, "during": during,
                "rss_per_conn_kib": during["rss_kib"] / count,
                "pss_per_conn_kib": during["pss_kib"] / count,
                "rss_delta_per_conn_kib": (during["rss_kib"] - before["rss_kib"]) / count,
                "pss_delta_per_conn_kib": (during["pss_kib"] - before["pss_kib"]) / count,
                "load": loadavg(),
            }

        log(f"memory at {count} idle authenticated connections")
        self.results["memory"] = self.alternate(1 if self.args.quick else 2, run,
                                                self.first_and_dovecots)

    def capacity(self) -> None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # mailbag holds two descriptors per session (socket + maildrop lock); keep headroom.
        fd_cap = (nofile - 100) // 2
        target = 2000 if self.args.quick else 10_000
        steps = [500, 2000] if self.args.quick else [1000, 2500, 5000, 7500, 10_000]
        rate, seconds = (20.0, 3.0) if self.args.quick else (20.0, 5.0)
        out: dict[str, Any] = {"target": target, "fd_cap": fd_cap, "nofile": nofile,
                               "trickle_rate": rate, "trickle_seconds": seconds}
        # Capacity takes minutes per server: one mailbag against one Dovecot, the
        # tuned one.  The mailbag with the most workers: each worker process has
        # its own descriptor limit, so that is the one that can reach the target.
        bags = [n for n in self.names if n.startswith("mailbag")]
        bag = max(bags, key=lambda n: getattr(self.srv[n], "workers", 1))
        dovecots = [n for n in self.names if n == servers.TUNED_DOVECOT] or [
            n for n in self.names if not n.startswith("mailbag")][:1]
        out["servers"] = [bag, *dovecots]
        for name in out["servers"]:
            log(f"capacity {name}")
            server = self.srv[name]
            workers = getattr(server, "workers", 1)
            base = server.memory()
            levels: list[dict[str, Any]] = []
            stop_reason = "reached target"
            started = time.monotonic()
            with self.holder(name) as ask:
                for level in steps:
                    if name.startswith("mailbag") and level > fd_cap * workers:
                        level = fd_cap * workers
                        if levels and levels[-1]["level"] >= level:
                            stop_reason = f"descriptor limit ({nofile})"
                            break
                    held = levels[-1]["held"] if levels else 0
                    if levels and held:
                        now = server.memory()
                        per = (now["pss_kib"] - base["pss_kib"]) / held
                        need = per * (level - held) * 1.3
                        if mem_available_kib() - need < 3 * 2**20:
                            stop_reason = (f"memory guard: {level} would need ~{need / 2**20:.1f}"
                                           f" GiB more, {mem_available_kib() / 2**20:.1f} free")
                            break
                    grown = ask(f"grow {level}")
                    alive = ask("check")
                    trickle = ask(f"trickle {rate} {seconds}")
                    mem = server.memory()
                    ok = (grown["held"] >= level and alive["alive"] == grown["held"]
                          and trickle["failures"] == 0 and trickle["p99_ms"] < 1000)
                    entry = {"level": level, "held": grown["held"], "alive": alive["alive"],
                             "grow_seconds": grown["seconds"], "grow_failures": grown["failures"],
                             "first_failure": grown["first_failure"] or trickle["first_failure"],
                             "trickle": trickle, "memory": mem, "ok": ok, "load": loadavg()}
                    levels.append(entry)
                    log(f"  {name} level {level}: {compact(entry)}")
                    if not ok:
                        stop_reason = "failed at this level"
                        break
                    if time.monotonic() - started > (120 if self.args.quick else 420):
                        stop_reason = "time budget"
                        break
                else:
                    if levels and levels[-1]["level"] < target:
                        stop_reason = f"descriptor limit ({nofile})"
            self._settle(name, int(base["processes"]))
            passed = [e["held"] for e in levels if e["ok"]]
            out[name] = {"levels": levels, "capacity": max(passed, default=0),
                         "stop_reason": stop_reason}
        self.results["capacity"] = out


def warm_page_cache(maildir: Path) -> None:
    """Read every message file once, so a "cold" (index-less) open is not also a cold disk.

    Whichever server ran first would otherwise pay the disk reads and the
    other find the files cached; with everything cached both do the same
    work (list, read the unsized half, build an index).  The host's memory
    reclaimer can evict files between runs, which is why this runs each time.
    """
    for sub in ("cur", "new"):
        with os.scandir(maildir / sub) as entries:
            for entry in entries:
                with contextlib.suppress(OSError), open(entry.path, "rb") as f:
                    f.read()


def git_commit() -> str:
    """The commit measured, with ``-dirty`` when the work tree has changes."""
    out = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty",
                          "--abbrev=12"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def compact(result: dict[str, Any]) -> str:
    """A one-line summary of a result for the progress log."""
    keys = ("rate", "cpu_ms_per_session", "p99_ms", "mb_per_s", "msgs_per_s", "bad", "errors",
            "cold", "warm", "pss_per_conn_kib", "rss_per_conn_kib", "held", "alive", "ok", "load")
    parts = []
    for key in keys:
        if key in result:
            value = result[key]
            parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    if "trickle" in result:
        parts.append(f"trickle_p99={result['trickle']['p99_ms']:.0f}ms")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (~2-3 minutes)")
    parser.add_argument("--reps", type=int, help="A B pairs per figure (default 3, quick 2)")
    parser.add_argument("--reps-new", type=int,
                        help="reps of the TLS and concurrency-8 figures (default: --reps, at "
                        "most 2): " + ",".join(NEW_FIGURES))
    parser.add_argument("--only", help="comma-separated scenarios: " + ",".join(report.ORDER))
    parser.add_argument("--figures", help="only these figures of sessions/retr, comma-separated: "
                        "plain-c1,plain-c50,argon-c1,argon-c50,tls-c1,tls-c50,"
                        + ",".join(f[0] for f in Bench.RETR_FIGURES))
    parser.add_argument("--dovecot", default=",".join(servers.DOVECOT_VARIANTS),
                        help="comma-separated Dovecot variants (default: all): "
                        + ",".join(servers.DOVECOT_VARIANTS))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/mailbag-bench"),
                        help="Maildirs, configs and logs (data is reused between runs)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    parser.add_argument("--no-report", action="store_true", help="print JSON, leave docs alone")
    parser.add_argument(
        "--mailbag-workers", default="1,2", metavar="N[,M...]",
        help="server.workers for mailbag (default 1,2); several run side by side as mailbag, "
        "mailbag-w2, ...; sessions and RETR figures report each against Dovecot and against "
        "the first (bigbox, memory and capacity: the first only)",
    )
    args = parser.parse_args(argv)
    worker_counts = [int(n) for n in args.mailbag_workers.split(",")]
    variants = {("mailbag" if i == 0 else f"mailbag-w{n}"): n
                for i, n in enumerate(worker_counts)}
    args.reps = args.reps or (2 if args.quick else 3)
    args.reps_new = args.reps_new or min(args.reps, 2)
    only = args.only.split(",") if args.only else list(report.ORDER)

    started = time.monotonic()
    servers.ensure_dovecot()
    ensure_python_deps()
    raise_fd_limit()
    layout = data.Layout()
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    owner = servers.mail_owner()
    users = data.users_file_lines(layout, servers.argon2_hash(data.PASSWORD))
    paths = data.build(workdir, layout, users, owner, log=log)
    tls = servers.write_tls_pair(workdir, owner)
    paths["tls_cert"] = tls.cert
    max_conn = layout.hold_users + 500
    srv: dict[str, servers.Server] = {}
    for name in [*variants, *args.dovecot.split(",")]:
        if name not in variants and name not in servers.DOVECOT_VARIANTS:
            parser.error(f"unknown Dovecot variant {name!r}")
        home = workdir / name
        home.mkdir(exist_ok=True)
        home.chmod(0o755)
        if name in variants:
            if os.geteuid() == 0:
                # mailbag drops to the Maildirs' owner and keeps state files (known-good
                # networks) in its working directory, as a deployment's state directory.
                os.chown(home, *owner)
            srv[name] = servers.Mailbag(home, paths["mail"], paths["users"], max_conn,
                                        workers=variants[name], tls=tls)
        else:
            srv[name] = servers.Dovecot(home, paths["mail"], paths["users"], max_conn, name,
                                        tls=tls)
    env_machine = machine()
    results: dict[str, Any] = {
        "command": "python bench/run.py" + (" " + shlex.join(argv or sys.argv[1:])
                                            if (argv or sys.argv[1:]) else ""),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": env_machine,
        "quick": args.quick,
        "mailbag_workers": variants,
        "reps": args.reps,
        "reps_new": args.reps_new,
        "new_figures": list(NEW_FIGURES),
        "load_start": os.getloadavg(),
        "commit": git_commit(),
        "servers": {name: {"label": server.label, "settings": server.settings(),
                           "variant": servers.variant_settings(name)}
                    for name, server in srv.items()},
    }
    bench = Bench(args, srv, paths, layout)
    try:
        for server in srv.values():
            server.start()
            log(f"{server.name} listening on 127.0.0.1:{server.port}")
        for scenario in report.ORDER:
            if scenario in only:
                if scenario == "capacity":
                    results["load_before_capacity"] = os.getloadavg()
                getattr(bench, scenario)()
    finally:
        for server in srv.values():
            server.stop()
    results.update(bench.results)
    results["load_end"] = os.getloadavg()
    results["minutes"] = round((time.monotonic() - started) / 60, 1)
    # Only a full run's figures belong in the repository (docs/benchmarks.md cites them).
    raw = workdir / "results-quick.json" if args.quick else HERE / "results.json"
    raw.write_text(json.dumps(results, indent=1))
    log(f"raw figures in {raw}; {results['minutes']} minutes")
    if args.no_report:
        print(json.dumps(results, indent=1))
    else:
        report.write(results, args.out)
        log(f"wrote {args.out}")
    summary = report.summary(results)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


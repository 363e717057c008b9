"""A PostgreSQL primary and a synchronous streaming replica of our own, for failover tests.

initdb + pg_basebackup in temporary directories, loopback ports, run as the
``postgres`` account when we are root (PostgreSQL refuses root).  The shared
server on 5432 is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.conftest import free_port

PG_BIN = os.environ.get("MAILBAG_PG_BIN", "/usr/lib/postgresql/15/bin")
STANDBY_NAME = "replica1"


class PgServer:
    """One PostgreSQL data directory and its server process."""

    def __init__(self, root: str, name: str) -> None:
        self.root = root
        self.data = os.path.join(root, name)
        self.log = os.path.join(root, f"{name}.log")
        self.port = free_port()  # outside the ephemeral range, see tests.conftest
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, tool: str, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([*self._as, os.path.join(PG_BIN, tool), *args], check=True,
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)
        return done.stdout

    def psql(self, sql: str) -> str:
        return self.run("psql", "-XAtq", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                        "postgres", "-d", "postgres", "-c", sql, timeout=20).strip()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self.run("pg_ctl", "-D", self.data, "-o", options, "-l", self.log, "-w", "-t", "60",
                 "start")

    def stop(self, mode: str = "immediate") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once: the machine is gone.

        (Killing the postmaster alone leaves backends holding client
        connections, waiting for a synchronous-replication ack, which is a
        different failure: a hung server, bounded by ``command_timeout``.)
        """
        with open(os.path.join(self.data, "postmaster.pid")) as pid_file:
            postmaster = int(pid_file.readline())
        victims = [postmaster]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry}/stat") as stat:
                        ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                    if ppid == postmaster:
                        victims.append(int(entry))
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return
            time.sleep(0.05)


class PrimaryAndReplica:
    """A primary with ``synchronous_standby_names`` and one streaming replica."""

    def __init__(self) -> None:
        if not os.path.exists(os.path.join(PG_BIN, "pg_basebackup")):
            pytest.skip(f"no PostgreSQL binaries in {PG_BIN} (set MAILBAG_PG_BIN)")
        self.root = tempfile.mkdtemp(prefix="mailbag-pgpair-")
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root)
                pytest.skip("running as root and there is no postgres account")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o755)
        self.primary = PgServer(self.root, "primary")
        self.replica = PgServer(self.root, "replica")

    def start(self) -> None:
        p = self.primary
        p.run("initdb", "-D", p.data, "-A", "trust", "-U", "postgres", "--no-sync")
        with open(os.path.join(p.data, "postgresql.auto.conf"), "a") as conf:
            # A commit returns only once the replica has flushed it: what got "250" survives.
            conf.write(f"synchronous_standby_names = '{STANDBY_NAME}'\n"
                       "synchronous_commit = on\nwal_keep_size = '64MB'\n")
        p.start()
        r = self.replica
        r.run("pg_basebackup", "-h", "127.0.0.1", "-p", str(p.port), "-U", "postgres",
              "-D", r.data, "-R", "-X", "stream", "--no-sync",
              "-d", f"host=127.0.0.1 port={p.port} user=postgres application_name={STANDBY_NAME}")
        # The copy carries the primary's synchronous_standby_names; once promoted, the
        # replica would wait for a standby of its own that does not exist, and every
        # commit would hang.  A standby ignores the setting, so drop it before start.
        auto = os.path.join(r.data, "postgresql.auto.conf")
        with open(auto) as conf:
            kept = [line for line in conf if not line.startswith("synchronous_standby_names")]
        with open(auto, "w") as conf:
            conf.writelines(kept)
        r.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = p.psql("SELECT sync_state FROM pg_stat_replication")
            if state == "sync":
                return
            time.sleep(0.2)
        raise RuntimeError(f"replica never became synchronous: {state!r}")

    def dsn(self, database: str) -> str:
        """Multi-host DSN: whichever of the two accepts writes (libpq/asyncpg semantics)."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},"
                f"127.0.0.1:{self.replica.port}/{database}?target_session_attrs=read-write")

    def promote(self) -> None:
        self.replica.run("pg_ctl", "-D", self.replica.data, "-w", "promote")

    def destroy(self) -> None:
        for server in (self.primary, self.replica):
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)

"""Both servers for the side-by-side benchmark, on the same Maildirs, each on private ports.

``Dovecot`` writes its own ``dovecot.conf`` (own base_dir, state_dir,
instance_name, log file and loopback port; never the system instance) and
runs ``dovecot -F -c``; ``Mailbag`` writes a ``mailbag.toml`` and runs
``python -m mailbag serve``.  Both read the same passwd-file format
(``name:{SCHEME}data``), and ``write_users`` writes the *same* entries to
both files, so the hashing scheme and cost are identical by construction.

Dovecot refuses to access mail as root, so the Maildirs belong to the
``dovecot`` system user; mailbag runs as the invoking user (root here) and
can read them.

Dovecot runs in four variants (``DOVECOT_VARIANTS``), because which of its
settings is "fair" is a matter of opinion and the honest answer is to
measure them all and compare against the fastest:

* *process per session* (``service pop3 { service_count = 1 }``, Dovecot's
  high-security default: a freshly forked ``pop3`` process per session) or
  *reused processes* (``service_count = 100; process_min_avail = 2;
  client_limit = 1; idle_kill = 10 secs``: what an administrator tuning for
  load runs);
* ``pop3_lock_session = no`` (Dovecot's default) or ``yes`` (the RFC 1939
  exclusive maildrop lock that mailbag always takes).

Common to all variants, following Dovecot's documentation (doc.dovecot.org,
"Login processes" and "Service configuration"):

* ``service pop3-login { service_count = 0; process_min_avail = <cores>;
  client_limit = 2000 }``: the documented *high-performance mode*: a few
  long-lived login processes, one per core, each multiplexing many
  not-yet-authenticated connections, instead of one process per connection.
* ``service pop3 { client_limit = 1; process_limit = 10500 }``: the docs
  recommend ``client_limit = 1`` for mail processes (they block on disk and
  locks); ``process_limit`` must cover the concurrent sessions we hold.
* ``default_client_limit = 11000``: log, anvil, stats and config accept one
  connection from every mail process; 1000 would cap sessions there.
* ``default_vsz_limit = 1G``: Argon2 with m=64 MiB plus the docs' advice to
  grow vsz_limit with ``service_count = 0``.
* logging at the default level (info: one line per login and logout) to a
  file, the same as mailbag's ``log.level = "info"`` to a file.
* ``auth_cache_size = 10M``, ``auth_cache_ttl = 300 s``,
  ``auth_cache_negative_ttl = 0``, ``auth_cache_verify_password_with_worker
  = yes``: Dovecot's authentication cache, off by default.  It saves the
  passdb lookup but still verifies the password against the cached hash at
  every login, so the docs advise verifying in the auth workers (all cores)
  when hashes are strong.  mailbag's cache (``auth.cache_ttl``) skips the
  hash on a repeated login altogether, so the benchmark runs mailbag with
  ``auth.cache_ttl = 0``: both servers hash every Argon2id login, and the
  Argon2id figures measure hashing on both.

TLS (the ``tls-c1``/``tls-c50`` figures): both servers get a second, implicit-
TLS listener (POP3S, RFC 8314) on their own loopback port and the *same*
certificate and key, made by ``write_tls_pair`` for each run (ECDSA P-256,
what ``mailbag init`` makes too).  Protocol versions, suites and groups are
left at each server's defaults (both: TLS 1.2 minimum, OpenSSL's TLS 1.3
suites and groups), so a default client negotiates TLS 1.3 with both; the
load generator records what was negotiated.  Both also offer STLS on the
plain port (a CAPA line; the other figures never use it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

DOVECOT = "/usr/sbin/dovecot"

class Variant(NamedTuple):
    """What differs between the Dovecot variants."""

    label: str
    pop3_service: tuple[str, ...]  # ``service pop3`` lines beyond the common ones
    lock: bool  # pop3_lock_session


REUSED_PROCESSES = ("service_count = 100", "process_min_avail = 2", "idle_kill = 10 secs")
DOVECOT_VARIANTS: dict[str, Variant] = {
    "dovecot-fork-nolock": Variant("process per session, lock no", ("service_count = 1",), False),
    "dovecot-fork-lock": Variant("process per session, lock yes", ("service_count = 1",), True),
    "dovecot-reuse-nolock": Variant("reused processes, lock no", REUSED_PROCESSES, False),
    "dovecot-reuse-lock": Variant("reused processes, lock yes", REUSED_PROCESSES, True),
}
def variant_settings(name: str) -> dict[str, str]:
    """The settings that make Dovecot variant ``name`` (empty for mailbag), for the report."""
    spec = DOVECOT_VARIANTS.get(name)
    if spec is None:
        return {}
    return {"service pop3": "; ".join(("client_limit = 1", *spec.pop3_service)),
            "pop3_lock_session": "yes" if spec.lock else "no"}


#: The variant issue 15 calls "tuned": reused processes, Dovecot's default lock setting.
TUNED_DOVECOT = "dovecot-reuse-nolock"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Block until ``port`` accepts connections, or fail with the server's log."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on {port}")


def mail_owner() -> tuple[int, int]:
    """uid/gid that owns the Maildirs: ``dovecot`` as root, else ourselves."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam("dovecot")
        return pw.pw_uid, pw.pw_gid
    return os.geteuid(), os.getegid()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), for memory accounting."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    result, todo = [], [pid]
    while todo:
        current = todo.pop()
        result.append(current)
        todo.extend(children.get(current, []))
    return result


def memory_of(pids: list[int]) -> dict[str, float]:
    """Sum of RSS and of PSS (shared pages split between sharers) in KiB over ``pids``."""
    rss = pss = 0
    counted = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
                text = f.read()
        except OSError:
            continue
        counted += 1
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return {"rss_kib": rss, "pss_kib": pss, "processes": counted}


def can_run_python_as(user: str) -> bool:
    """Can ``user`` run this interpreter (and import mailbag)?"""
    result = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import mailbag"],
                            capture_output=True, check=False)
    return result.returncode == 0


class TlsPair(NamedTuple):
    """The certificate and key both servers present on their POP3S listener."""

    cert: Path
    key: Path


def write_tls_pair(directory: Path, owner: tuple[int, int]) -> TlsPair:
    """A fresh self-signed ECDSA P-256 certificate for 127.0.0.1, shared by both servers.

    Made on every run (milliseconds) rather than kept with the data, so no
    certificate ever expires between runs.  The key belongs to the mail
    owner: mailbag's workers load it after dropping root to that user;
    Dovecot reads it as root (``ssl_key = <path``).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailbag-bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pair = TlsPair(directory / "bench-cert.pem", directory / "bench-key.pem")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.unlink(missing_ok=True)
    fd = os.open(pair.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    if os.geteuid() == 0:
        os.chown(pair.key, *owner)
    return pair


class Server:
    """Common start/stop for a server subprocess."""

    name = "server"
    label = ""

    def __init__(self, home: Path, name: str | None = None) -> None:
        self.name = name or self.name
        self.label = self.label or self.name
        self.home = home
        self.port = free_port()
        #: The implicit-TLS (POP3S) port, when the server was given a certificate.
        self.tls_port: int | None = None
        self.log = home / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    config: Path

    def settings(self) -> str:
        """The server's generated config file, as recorded with the results."""
        return self.config.read_text()

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.DEVNULL, stderr=log, cwd=self.home
            )
        wait_for_port(self.port, self.proc, self.name, self.log)
        if self.tls_port is not None:
            wait_for_port(self.tls_port, self.proc, self.name, self.log)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)

    def memory(self) -> dict[str, float]:
        return memory_of(self.pids())

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's whole process tree.

        Live processes count their own time plus that of the children they
        reaped (``cutime``/``cstime``), so Dovecot's per-session processes
        that came and went are included; differences between two calls
        give the CPU a load cost the server.
        """
        ticks = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Mailbag(Server):
    """``python -m mailbag serve`` with a generated config (``workers``: ``server.workers``)."""

    name = "mailbag"

    def __init__(self, home: Path, mail_root: Path, users: Path, max_connections: int,
                 workers: int = 1, tls: TlsPair | None = None) -> None:
        super().__init__(home)
        self.workers = workers
        if tls is not None:
            self.tls_port = free_port()
        listen_tls = f'"127.0.0.1:{self.tls_port}"' if tls is not None else ""
        tls_section = f'\n[tls]\ncert = "{tls.cert}"\nkey = "{tls.key}"\n' if tls else ""
        self.config = home / "mailbag.toml"
        # As root, run as the Maildirs' owner, like Dovecot's mail processes.  With
        # workers, that user must be able to run this interpreter (the supervisor execs
        # workers after dropping root); if it cannot (a venv under /root), stay root.
        owner = pwd.getpwuid(mail_owner()[0]).pw_name
        process = f'\n[process]\nuser = "{owner}"\n' if os.geteuid() == 0 else ""
        if process and workers > 1 and not can_run_python_as(owner):
            process = "\n[process]\nallow_root = true\n"
        self.config.write_text(f"""\
[server]
hostname = "bench"
listen = ["127.0.0.1:{self.port}"]
listen_tls = [{listen_tls}]
workers = {workers}
{tls_section}
[storage]
maildir = "{mail_root}/{{user}}"

[auth]
users_file = "{users}"
cache_ttl = 0

[limits]
max_connections = {max_connections}
max_connections_per_ip = {max_connections}

[log]
level = "info"
{process}""")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mailbag", "serve", "-c", str(self.config)]


class Dovecot(Server):
    """A private ``dovecot -F`` with its own config, base_dir and port."""

    name = "dovecot"

    def __init__(self, home: Path, mail_root: Path, users: Path, max_connections: int,
                 variant: str = TUNED_DOVECOT, tls: TlsPair | None = None) -> None:
        super().__init__(home, variant)
        if tls is not None:
            self.tls_port = free_port()
            ssl = f"ssl = yes\nssl_cert = <{tls.cert}\nssl_key = <{tls.key}"
            pop3s = f"address = 127.0.0.1\n    port = {self.tls_port}\n    ssl = yes"
        else:
            ssl, pop3s = "ssl = no", "port = 0"
        spec = DOVECOT_VARIANTS[variant]
        self.label = spec.label
        self.config = home / "dovecot.conf"
        pop3_service = "".join(f"  {line}\n" for line in spec.pop3_service)
        lock = "yes" if spec.lock else "no"
        cores = os.cpu_count() or 1
        if os.geteuid() == 0:
            internal, login, mail_user = "dovecot", "dovenull", "dovecot"
        else:
            internal = login = mail_user = pwd.getpwuid(os.geteuid()).pw_name
        for sub in ("run", "state"):
            (home / sub).mkdir(exist_ok=True)
        self.config.write_text(f"""\
base_dir = {home}/run
state_dir = {home}/state
instance_name = mailbag-bench-{os.getpid()}-{self.port}
protocols = pop3
listen = 127.0.0.1
log_path = {self.log}
{ssl}
auth_mechanisms = plain
disable_plaintext_auth = no
default_internal_user = {internal}
default_login_user = {login}
mail_uid = {mail_user}
mail_gid = {mail_user}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{mail_root}/%u
pop3_uidl_format = %08Xu%08Xv
pop3_lock_session = {lock}
auth_cache_size = 10M
auth_cache_ttl = 300 s
auth_cache_negative_ttl = 0
auth_cache_verify_password_with_worker = yes
default_client_limit = {max_connections + 1000}
default_vsz_limit = 1G
passdb {{
  driver = passwd-file
  args = username_format=%u {users}
}}
userdb {{
  driver = static
  args = home={mail_root}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    {pop3s}
  }}
  service_count = 0
  process_min_avail = {cores}
  client_limit = 2000
}}
service pop3 {{
  client_limit = 1
  process_limit = {max_connections + 500}
{pop3_service}}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")

    def command(self) -> list[str]:
        return [DOVECOT, "-F", "-c", str(self.config)]


def ensure_dovecot() -> None:
    """Install Dovecot's POP3 server with apt-get if it is missing (a fresh machine)."""
    if os.path.exists(DOVECOT) and shutil.which("doveadm"):
        return
    if os.geteuid() != 0:
        raise SystemExit("Dovecot is missing; run as root once, or: apt-get install dovecot-pop3d")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends",
         "dovecot-core", "dovecot-pop3d"],
        check=True, env=env,
    )


def argon2_hash(password: str) -> str:
    """One ``{ARGON2ID}`` hash made by Dovecot itself (libsodium's defaults)."""
    out = subprocess.run(
        ["doveadm", "pw", "-s", "ARGON2ID", "-p", password],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()

"""``mailbag check [-c FILE]``: validate a config without starting anything.

Run it before ``systemctl reload mailbag`` (and ``ExecReload`` could): it
checks what ``serve`` and a SIGHUP reload would check (the file parses, the
certificate and key load and match, the users file reads, the mail root is
usable, the run-as account exists, the metrics package is there) and also
what only hurts later (a certificate about to expire).  It never binds a
port, creates a directory or writes a file.  Exit status 0 when nothing
failed (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
from pathlib import Path

from mailbag.auth.users import UsersFile
from mailbag.cli.common import add_config_option, config_from_args
from mailbag.cli.wiring import build_store
from mailbag.config import Config
from mailbag.errors import AuthError, ConfigError, MailbagError
from mailbag.server.metrics import load_prometheus
from mailbag.server.privileges import resolve
from mailbag.server.tls import TlsContext
from mailbag.storage.base import SelfCheck

#: Warn when the certificate expires within this many days.
CERT_WARN_DAYS = 14


class Report:
    """Collected results: ``ok``/``warn``/``FAIL`` lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def ok(self, text: str) -> None:
        self.lines.append(("ok", text))

    def warn(self, text: str) -> None:
        self.lines.append(("warn", text))

    def fail(self, text: str) -> None:
        self.lines.append(("FAIL", text))

    @property
    def failed(self) -> bool:
        return any(level == "FAIL" for level, _ in self.lines)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``check`` command."""
    parser = subparsers.add_parser(
        "check",
        help="validate a config file without starting anything",
        description="Validate a config file: syntax and values, TLS certificate and key, users "
        "file, mail root, run-as account, metrics. Binds nothing, writes nothing. "
        "Exit status 0 if nothing failed.",
    )
    add_config_option(parser)
    parser.set_defaults(handler=run)


def _check_tls(config: Config, report: Report) -> None:
    cert, key = config.tls.cert, config.tls.key
    if cert is None or key is None:
        if any(a.tls for a in config.listen):
            report.fail("tls: TLS listeners need tls.cert and tls.key")
        else:
            report.warn("tls: no certificate; clients can only log in over loopback/plaintext "
                        "networks")
        return
    try:
        TlsContext(cert, key)
    except ConfigError as exc:
        report.fail(str(exc))
        return
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (ValueError, OSError) as exc:  # loaded by OpenSSL above, so this is unusual
        report.warn(f"tls.cert: cannot read the expiry date: {exc}")
        return
    expires = certificate.not_valid_after_utc
    left = expires - datetime.datetime.now(datetime.UTC)
    when = expires.strftime("%Y-%m-%d")
    if left.total_seconds() <= 0:
        report.fail(f"tls.cert: {cert} expired on {when}")
    elif left.days < CERT_WARN_DAYS:
        report.warn(f"tls.cert: {cert} expires in {left.days} days ({when})")
    else:
        report.ok(f"tls: {cert} (valid until {when})")


def _check_users(config: Config, report: Report) -> None:
    if config.auth.backend == "postgres":
        report.ok("users: the users table of [database]")
        return
    path = config.auth.users_file
    if not path.exists():
        report.warn(f"auth.users_file: {path} does not exist yet (no one can log in); "
                    "`mailbag user add` creates it")
        return
    if not os.access(path, os.R_OK):
        report.fail(f"auth.users_file: {path} is not readable")
        return
    users = UsersFile(path, default_domain=config.auth.default_domain or None)
    try:
        count = len(users.list())
    except AuthError as exc:
        report.fail(f"auth.users_file: {exc}")
        return
    for problem in users.problems:
        report.warn(f"auth.users_file: {problem}")
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        report.warn(f"auth.users_file: {path} is readable by everyone (mode {mode:04o}); "
                    "use 0600 or 0640")
    report.ok(f"users: {path} ({count} accounts)")


def _check_database(config: Config, report: Report) -> None:
    """Reach the database and compare its schema version with this mailbag's."""
    if "postgres" not in (config.storage.backend, config.auth.backend):
        return
    try:
        from mailbag.cli.wiring import build_database
        from mailbag.database import schema
    except ImportError as exc:
        report.fail(f"database: the postgres backend needs asyncpg "
                    f"(pip install 'mailbag[postgres]'): {exc}")
        return

    async def version() -> int:
        db = build_database(config)
        try:
            return await schema.version(db)
        finally:
            await db.close()

    try:
        found = asyncio.run(version())
    except MailbagError as exc:
        report.fail(f"database: {exc}")
        return
    problem = schema.problem(found)
    if problem is not None:
        report.fail(f"database: {problem}")
    else:
        report.ok(f"database: schema version {found} (current)")


def _check_storage(config: Config, report: Report) -> None:
    try:
        store = build_store(config)
        line = store.check() if isinstance(store, SelfCheck) else None
    except ConfigError as exc:
        report.fail(str(exc))
        return
    report.ok(line or f"storage: {config.storage.backend}")


def _check_process(config: Config, report: Report) -> None:
    try:
        account = resolve(config.process)
    except ConfigError as exc:
        report.fail(str(exc))
        return
    if account is not None:
        report.ok(f"process: drops to {account.user} (uid {account.uid}, gid {account.gid}) "
                  "after binding")
    elif os.geteuid() == 0 and not config.process.allow_root:
        report.fail("process: started as root without process.user, serve would refuse to run "
                    "(set process.user, or process.allow_root = true)")
    elif config.process.allow_root:
        report.warn("process: allow_root = true: the server may run as root")


def _check_metrics(config: Config, report: Report) -> None:
    if not config.metrics.listen:
        report.ok("metrics: off")
        return
    try:
        load_prometheus()
    except ConfigError as exc:
        report.fail(str(exc))
        return
    host = config.metrics.listen.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost"):
        report.warn(f"metrics.listen: {config.metrics.listen} is not loopback; the endpoint "
                    "has no authentication, firewall it")
    report.ok(f"metrics: http://{config.metrics.listen}/metrics and /healthz")


def check_config(config: Config) -> Report:
    """Run every check; never raises for a problem it can describe."""
    report = Report()
    listeners = ", ".join(f"{a}{' (TLS)' if a.tls else ''}" for a in config.listen) or "none"
    report.ok(f"config: {config.path or 'defaults'}")
    report.ok(f"listen: {listeners}")
    _check_tls(config, report)
    _check_users(config, report)
    _check_storage(config, report)
    _check_database(config, report)
    _check_process(config, report)
    _check_metrics(config, report)
    return report


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag check``."""
    config = config_from_args(args)
    report = check_config(config)
    for level, text in report.lines:
        print(f"{level:4} {text}")
    path = config.path or Path("defaults")
    print(f"{path}: {'FAILED' if report.failed else 'OK'}")
    return 1 if report.failed else 0

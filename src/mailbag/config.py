"""Configuration: a TOML file read into frozen dataclasses, validated up front.

Every key has a default, so an empty file is a valid (loopback-only) config,
and every error names the key or path at fault: an administrator should never
have to read a traceback to fix a typo.  Relative paths are resolved against
the directory of the config file, so a config written by ``mailbag init`` works
wherever it is started from.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mailbag.errors import ConfigError

CONFIG_ENV = "MAILBAG_CONFIG"
DEFAULT_GREETING = "mailbag POP3 server ready."
DEFAULT_CONFIG_NAME = "mailbag.toml"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One ``host:port`` to listen on; ``tls`` means implicit TLS (POP3S, RFC 8314)."""

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits; each guards against one way of exhausting the server."""

    #: RFC 1939 section 3: the autologout timer is at least 10 minutes.
    idle_timeout: float = 600.0
    #: Before login a client has far less reason to idle (guessing, slowloris).
    login_timeout: float = 60.0
    max_connections: int = 5000
    max_connections_per_ip: int = 50
    #: RFC 2449 section 4: 255 octets per command line, CRLF included.
    max_command_line: int = 255
    max_sasl_line: int = 16384
    max_errors: int = 10
    max_auth_failures: int = 3
    #: Grace period for open sessions on SIGTERM/SIGINT.
    shutdown_grace: float = 10.0


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Where users come from and how logins are defended."""

    #: "file": the users file; "postgres": the ``users`` table of [database].
    backend: str = "file"
    users_file: Path = Path("users")
    #: Login as ``name`` or ``name@default_domain`` reaches the same account.
    default_domain: str = ""
    #: Networks where USER/PASS and AUTH PLAIN are allowed without TLS
    #: (like Dovecot's ``disable_plaintext_auth``; loopback by default).
    plaintext_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    #: Seconds before a failed login is answered (same for unknown users).
    failure_delay: float = 2.0
    #: Upper bound of the growing delay for repeated failures from one address/account.
    max_failure_delay: float = 15.0
    #: How long failure counters remember an address or account.
    failure_window: float = 900.0
    #: Seconds a network stays known-good for an account after its last successful
    #: login from there (NIST SP 800-63B 5.2.2); 0 turns known-good networks off.
    known_good_ttl: float = 30 * 24 * 3600.0
    #: Prefix lengths that make one "network" for known-good sources.
    known_good_ipv4_prefix: int = 24
    known_good_ipv6_prefix: int = 64
    #: Where known-good networks are kept across restarts (None: in memory only).
    known_good_file: Path | None = Path("known-good.json")
    #: Seconds a successful password verification is remembered (0 = no cache).
    cache_ttl: float = 300.0
    #: Accounts the authentication cache holds at most (least recently used go first).
    cache_size: int = 100_000


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Certificate and key for STLS and the implicit-TLS listener."""

    cert: Path | None = None
    key: Path | None = None
    #: Offer STLS on plain listeners (requires cert and key).
    stls: bool = True


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Which backend stores mail, and where.

    ``backend`` names a backend of ``storage.registry``.  ``maildir`` is the
    built-in Maildir backend's location (typed and resolved here because it
    is the zero-setup default); every other key of ``[storage]`` lands in
    ``options`` and is handed to the backend, which rejects what it does not
    know (``registry.create_from_settings``).
    """

    backend: str = "maildir"
    #: Maildir location; ``{user}``, ``{local}`` and ``{domain}`` are substituted.
    maildir: str = "mail/{user}/Maildir"
    #: Largest message accepted for delivery, in octets (0 = unlimited).
    max_message_size: int = 50 * 1024 * 1024
    #: Backend-specific settings (``[storage]`` keys not listed above), as given in the file.
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """PostgreSQL, used when storage.backend or auth.backend is "postgres"."""

    #: libpq URI; several hosts + ``target_session_attrs=read-write`` follow a failover.
    dsn: str = ""
    #: Connections per node: a few, however many sessions the node serves.
    pool_min_size: int = 2
    pool_max_size: int = 10
    connect_timeout: float = 5.0
    #: A statement running longer is abandoned (the client gets a temporary error).
    command_timeout: float = 30.0
    #: A node that stops heartbeating loses its maildrop locks after this long.
    lease_time: float = 30.0
    #: Prefix of this node's lock-owner id ("" = the host name).
    node_name: str = ""


@dataclass(frozen=True, slots=True)
class ProcessSettings:
    """Who the server runs as once its ports are bound, and how it creates files."""

    #: Account to switch to after binding when started as root ("" = stay as started).
    user: str = ""
    #: Group to switch to ("" = the user's primary group).
    group: str = ""
    #: Serving as root is refused unless this is true (a bug must not own the machine).
    allow_root: bool = False
    #: File creation mask: 0o077 makes mail files 0600 and directories 0700.
    umask: int = 0o077


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The optional HTTP endpoint for Prometheus (``/metrics``) and health checks (``/healthz``)."""

    #: ``host:port`` to serve on; "" disables it.  Keep it on loopback or a private network.
    listen: str = ""


@dataclass(frozen=True, slots=True)
class LmtpSettings:
    """LMTP delivery from the MTA (RFC 2033); off unless a listener or socket is set."""

    #: TCP listeners, e.g. 127.0.0.1:24.  LMTP has no authentication: keep it local.
    listen: tuple[ListenAddress, ...] = ()
    #: Unix socket path (None = no socket).
    socket: Path | None = None
    #: Permissions of the socket file; the MTA's user must be able to connect.
    socket_mode: int = 0o660
    #: RFC 5321 section 4.5.3.2.7: wait at least 5 minutes for the next command.
    timeout: float = 300.0
    max_connections: int = 100


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """Default per-user quota (0 = unlimited); a users-file field overrides it."""

    bytes: int = 0
    messages: int = 0
    #: Over quota is 452 4.2.2 (retry) instead of 552 5.2.2 (bounce).
    tempfail: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    path: Path | None = None
    hostname: str = ""
    greeting: str = DEFAULT_GREETING
    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 1110),)
    #: ``server.trusted_proxies``: load balancers whose connections start with a PROXY header.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tls: TlsSettings = field(default_factory=TlsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: Limits = field(default_factory=Limits)
    lmtp: LmtpSettings = field(default_factory=LmtpSettings)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    process: ProcessSettings = field(default_factory=ProcessSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    log_level: str = "info"
    log_format: str = "text"


def parse_listen(value: str, *, tls: bool = False, key: str = "listen") -> ListenAddress:
    """Parse ``host:port`` or ``[v6]:port``."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: {value!r} is not host:port (e.g. 127.0.0.1:1110)")
    return ListenAddress(host, int(port), tls)


def _networks(
    value: object, name: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of addresses or networks (``"10.0.0.0/8"``, ``"::1"``)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}: expected a list of strings")
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{name}] must be a table")
    return section


def _build(cls: type, section: dict[str, Any], prefix: str, base: Path) -> Any:
    """Fill a settings dataclass from a TOML table, checking names and types."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in section.items():
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown setting")
        default = getattr(defaults, key)
        name = f"{prefix}.{key}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: expected true or false")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name}: expected a number of seconds >= 0")
            value = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}: expected a whole number >= 0")
        elif isinstance(default, Path) or (default is None and key in ("cert", "key")):
            if not isinstance(value, str):
                raise ConfigError(f"{name}: expected a path")
            value = (base / value).resolve() if value else None
        elif isinstance(default, tuple):
            value = _networks(value, name)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string")
        values[key] = value
    for key in known:
        default = getattr(defaults, key)
        if key not in values and isinstance(default, Path) and not default.is_absolute():
            values[key] = (base / default).resolve()
    return cls(**values)


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate a config file (``None``: ``$MAILBAG_CONFIG`` or ``./mailbag.toml``)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (create one with `mailbag init`)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return config_from_dict(data, path=path.resolve())


def _lmtp_settings(section: dict[str, Any], base: Path) -> LmtpSettings:
    """``[lmtp]``: the listen list and socket path need parsing ``_build`` does not do."""
    rest = dict(section)
    values = rest.pop("listen", [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError('lmtp.listen: expected a list of "host:port" strings')
    sock = rest.pop("socket", "")
    if not isinstance(sock, str):
        raise ConfigError("lmtp.socket: expected a path")
    built: LmtpSettings = _build(LmtpSettings, rest, "lmtp", base)
    if built.socket_mode > 0o777:
        raise ConfigError("lmtp.socket_mode: expected an octal mode such as 0o660")
    return LmtpSettings(
        listen=tuple(parse_listen(v, key="lmtp.listen") for v in values),
        socket=(base / sock).resolve() if sock else None,
        socket_mode=built.socket_mode,
        timeout=built.timeout,
        max_connections=built.max_connections,
    )


def _database_settings(
    section: dict[str, Any], base: Path, storage: StorageSettings, auth: AuthSettings
) -> DatabaseSettings:
    """``[database]``, checked against the backends that need it."""
    db: DatabaseSettings = _build(DatabaseSettings, section, "database", base)
    if auth.backend not in ("file", "postgres"):
        raise ConfigError(f'auth.backend: expected "file" or "postgres", not {auth.backend!r}')
    users = [name for name, value in (("storage", storage.backend), ("auth", auth.backend))
             if value == "postgres"]
    if users and not db.dsn:
        raise ConfigError(f"database.dsn: needed because {users[0]}.backend is \"postgres\"")
    if db.pool_max_size < 1 or db.pool_min_size > db.pool_max_size:
        raise ConfigError("database.pool_max_size: must be >= 1 and >= database.pool_min_size")
    if not 1.0 <= db.lease_time <= 300.0:
        raise ConfigError("database.lease_time: expected 1 to 300 seconds")
    return db


def config_from_dict(data: dict[str, Any], *, path: Path | None = None) -> Config:
    """Build a ``Config`` from parsed TOML (also used by tests and the demo)."""
    base = path.parent if path is not None else Path.cwd()
    known_top = {
        "server", "tls", "storage", "auth", "limits", "log", "lmtp", "quota", "process", "metrics",
        "database",
    }
    for key in data:
        if key not in known_top:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(sorted(known_top))})")
    server = _section(data, "server")
    allowed_server = {"hostname", "greeting", "listen", "listen_tls", "trusted_proxies"}
    for key in server:
        if key not in allowed_server:
            raise ConfigError(f"server.{key}: unknown setting")
    listen: list[ListenAddress] = []
    for key, tls in (("listen", False), ("listen_tls", True)):
        values = server.get(key, ["127.0.0.1:1110"] if key == "listen" else [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"server.{key}: expected a list of \"host:port\" strings")
        listen += [parse_listen(v, tls=tls, key=f"server.{key}") for v in values]
    for key in ("hostname", "greeting"):
        if key in server and not isinstance(server[key], str):
            raise ConfigError(f"server.{key}: expected a string")
    trusted_proxies = _networks(server.get("trusted_proxies", []), "server.trusted_proxies")
    log = _section(data, "log")
    level = log.get("level", "info")
    fmt = log.get("format", "text")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level: expected debug, info, warning or error")
    if fmt not in ("text", "json"):
        raise ConfigError("log.format: expected text or json")
    for key in log:
        if key not in ("level", "format"):
            raise ConfigError(f"log.{key}: unknown setting")
    tls_settings: TlsSettings = _build(TlsSettings, _section(data, "tls"), "tls", base)
    storage_table = _section(data, "storage")
    typed = {"backend", "maildir", "max_message_size"}
    storage: StorageSettings = _build(
        StorageSettings, {k: v for k, v in storage_table.items() if k in typed}, "storage", base
    )
    if "{user}" not in storage.maildir and "{local}" not in storage.maildir:
        raise ConfigError("storage.maildir: must contain {user} (or {local})")
    maildir = storage.maildir
    if not os.path.isabs(maildir):
        maildir = str(base / maildir)
    options = tuple(sorted((k, v) for k, v in storage_table.items() if k not in typed))
    storage = StorageSettings(storage.backend, maildir, storage.max_message_size, options)
    auth: AuthSettings = _build(AuthSettings, _section(data, "auth"), "auth", base)
    if auth.known_good_ipv4_prefix > 32:
        raise ConfigError("auth.known_good_ipv4_prefix: expected 0 to 32")
    if auth.known_good_ipv6_prefix > 128:
        raise ConfigError("auth.known_good_ipv6_prefix: expected 0 to 128")
    limits: Limits = _build(Limits, _section(data, "limits"), "limits", base)
    if limits.max_command_line < 64:
        raise ConfigError("limits.max_command_line: must be at least 64")
    if any(a.tls for a in listen) and (tls_settings.cert is None or tls_settings.key is None):
        raise ConfigError("server.listen_tls: needs tls.cert and tls.key")
    process: ProcessSettings = _build(ProcessSettings, _section(data, "process"), "process", base)
    if process.umask > 0o777:
        raise ConfigError("process.umask: expected an octal mask such as 0o077")
    metrics: MetricsSettings = _build(MetricsSettings, _section(data, "metrics"), "metrics", base)
    if metrics.listen:
        parse_listen(metrics.listen, key="metrics.listen")
    lmtp = _lmtp_settings(_section(data, "lmtp"), base)
    quota: QuotaSettings = _build(QuotaSettings, _section(data, "quota"), "quota", base)
    database = _database_settings(_section(data, "database"), base, storage, auth)
    return Config(
        path=path,
        hostname=server.get("hostname", ""),
        greeting=server.get("greeting", DEFAULT_GREETING),
        listen=tuple(listen),
        trusted_proxies=trusted_proxies,
        tls=tls_settings,
        storage=storage,
        auth=auth,
        limits=limits,
        lmtp=lmtp,
        quota=quota,
        process=process,
        metrics=metrics,
        database=database,
        log_level=level,
        log_format=fmt,
    )

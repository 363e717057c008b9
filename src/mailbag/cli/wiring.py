"""The composition root: the one place that turns a ``Config`` into concrete objects.

Only here are concrete objects built (DESIGN.md): the users file, the
throttle, the TLS context, and the store, which the storage registry builds
from ``storage.backend`` (this module never names a storage backend).
Everything else receives interfaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mailbag.auth.cache import VerificationCache
from mailbag.auth.users import UsersFile
from mailbag.config import Config
from mailbag.errors import ConfigError
from mailbag.protocol.capabilities import Pop3Policy
from mailbag.protocol.lmtp import LmtpPolicy
from mailbag.server.gate import ConnectionGate
from mailbag.server.listeners import ConnectionLimits, Endpoint, Listener
from mailbag.server.metrics import Metrics
from mailbag.server.services import LmtpService, Pop3Service
from mailbag.server.tls import TlsContext
from mailbag.session.authenticate import Authenticator
from mailbag.session.defence_state import MemoryFailureCounters
from mailbag.session.delivery import DeliveryAgent, Outcome, QuotaDefaults
from mailbag.session.known_good import KnownNetworksFile
from mailbag.session.lmtp import LmtpSessionSettings
from mailbag.session.observer import NULL_OBSERVER
from mailbag.session.pop3 import SessionSettings
from mailbag.session.sasl import DRIVER_MECHANISMS
from mailbag.session.throttle import DefenceState, FailureThrottle
from mailbag.storage import registry
from mailbag.storage.base import SelfCheck, Store

if TYPE_CHECKING:
    from mailbag.database.pool import Database


#: Builds the authentication cache for ``(auth.cache_ttl, auth.cache_size)``.
CacheFactory = Callable[[float, int], VerificationCache]


def local_auth_cache(ttl: float, max_entries: int) -> VerificationCache:
    """This process's own cache (one process; a worker's is shared: ``WorkerLink``)."""
    return VerificationCache(ttl, max_entries=max_entries)


@dataclass(slots=True)
class Runtime:
    """Everything a running server needs, built from one config."""

    config: Config
    users: UsersFile
    store: Store
    tls: TlsContext | None
    #: Failure counters and known-good networks; kept across SIGHUP reloads.
    defence: DefenceState
    #: Makes the authentication cache (a new, empty one at every reload).
    auth_cache: CacheFactory = local_auth_cache


def build_store(config: Config, backend: str | None = None) -> Store:
    """The storage backend named by ``storage.backend`` (or ``backend``), built by the registry.

    The typed settings (``storage.maildir``, the ``[database]`` section, the
    host name) are offered to every backend and passed to those that declare
    them; any other ``[storage]`` key must be one the chosen backend declares.

    ``backend`` builds another one from the same config (``mailbag migrate
    maildir postgres``): it gets the typed settings only, since the other
    ``[storage]`` keys belong to ``storage.backend``.
    """
    storage = config.storage
    common = {"maildir": storage.maildir, "database": config.database,
              "hostname": config.hostname}
    if backend is not None and backend != storage.backend:
        return registry.create_from_settings(backend, common, {})
    return registry.create_from_settings(storage.backend, common, dict(storage.options))


def build_database(config: Config) -> Database:
    """The node's one PostgreSQL pool (``[database]``), shared by storage and users."""
    from mailbag.database.pool import shared_database

    return shared_database(config.database)


async def check_backend_schema(backend: object) -> None:
    """Refuse a database schema that is behind or ahead (backends with ``check_schema``)."""
    check = getattr(backend, "check_schema", None)
    if check is not None:
        await check()


async def close_backend(backend: object) -> None:
    """Close a backend's pool and heartbeat, if it has any (an async ``close``)."""
    close = getattr(backend, "close", None)
    if close is not None and asyncio.iscoroutinefunction(close):
        await close()


def prepare_store(store: Store) -> None:
    """Fail early, naming the setting, if mail cannot be stored (creates the mail root)."""
    if isinstance(store, SelfCheck):
        store.prepare()


def store_problems(store: Store) -> list[str]:
    """Cheap health probe of the store (``/healthz``, after a privilege drop)."""
    return store.problems() if isinstance(store, SelfCheck) else []


def build_users(config: Config) -> UsersFile:
    """The user store of ``auth.backend``, with the default domain for ``name@domain`` logins.

    Typed as ``UsersFile``: ``PostgresUsers`` has the same methods (lookup,
    list and the admin operations), checked by the CLI tests on both.
    """
    if config.auth.backend == "postgres":
        from mailbag.auth.pg_users import PostgresUsers

        users: UsersFile = PostgresUsers(  # type: ignore[assignment]
            database=build_database(config), default_domain=config.auth.default_domain or None
        )
        return users
    path = config.auth.users_file
    if path.exists() and not path.is_file():
        raise ConfigError(f"auth.users_file: {path} is not a file")
    return UsersFile(path, default_domain=config.auth.default_domain or None)


def uses_database(config: Config) -> bool:
    """Does this node share a PostgreSQL database with others (storage or users)?"""
    return "postgres" in (config.auth.backend, config.storage.backend)


def build_defence_state(config: Config) -> DefenceState:
    """The login defence's state.

    On the embedded default, counters in memory and known-good networks in a
    file; on a node that shares a database with others, both in the database,
    so spreading guesses over nodes gains an attacker nothing.
    """
    if uses_database(config):
        from mailbag.session.pg_defence import PostgresFailureCounters, PostgresKnownNetworks

        db = build_database(config)
        return DefenceState(PostgresFailureCounters(db), PostgresKnownNetworks(db))
    return DefenceState(MemoryFailureCounters(), KnownNetworksFile(config.auth.known_good_file))


def build_runtime(
    config: Config, *, defence: DefenceState | None = None,
    auth_cache: CacheFactory = local_auth_cache, store: Store | None = None,
) -> Runtime:
    """Validate paths and build the long-lived objects.

    ``defence`` and ``store`` keep those objects (a reload): a store holds
    state that must outlive a SIGHUP, e.g. PostgreSQL's lease keeper, whose
    node id and heartbeat the open sessions' locks depend on.
    """
    if store is None:
        store = build_store(config)
    prepare_store(store)
    tls = None
    if config.tls.cert is not None and config.tls.key is not None:
        tls = TlsContext(config.tls.cert, config.tls.key)
    return Runtime(
        config=config,
        users=build_users(config),
        store=store,
        tls=tls,
        defence=defence if defence is not None else build_defence_state(config),
        auth_cache=auth_cache,
    )


def plaintext_checker(config: Config) -> Callable[[str], bool]:
    """A predicate: may this peer address authenticate with plaintext on a clear channel?"""
    networks = config.auth.plaintext_networks

    def allowed(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in networks)

    return allowed


def pop3_service(runtime: Runtime, metrics: Metrics | None = None) -> Pop3Service:
    """What new POP3 connections get under this runtime (rebuilt at every SIGHUP)."""
    config = runtime.config
    limits = config.limits
    policy = Pop3Policy(
        max_command_line=limits.max_command_line,
        max_sasl_line=limits.max_sasl_line,
        max_errors=limits.max_errors,
        max_auth_failures=limits.max_auth_failures,
        # SCRAM first: clients that pick "the first they know" choose the one that never
        # shows the server a password.  PLAIN only where plaintext is allowed (capabilities).
        sasl_mechanisms=(*DRIVER_MECHANISMS, "PLAIN"),
        stls=config.tls.stls and runtime.tls is not None,
    )
    settings = SessionSettings(
        policy=policy,
        greeting=config.greeting,
        hostname=config.hostname,
        login_timeout=limits.login_timeout,
        idle_timeout=limits.idle_timeout,
        plaintext_allowed=plaintext_checker(config),
    )
    auth = config.auth
    throttle = FailureThrottle(
        base=auth.failure_delay,
        cap=auth.max_failure_delay,
        window=auth.failure_window,
        known_good_ttl=auth.known_good_ttl,
        ipv4_prefix=auth.known_good_ipv4_prefix,
        ipv6_prefix=auth.known_good_ipv6_prefix,
        state=runtime.defence,
    )
    authenticator = Authenticator(
        runtime.users,
        throttle,
        cache=runtime.auth_cache(auth.cache_ttl, auth.cache_size),
        observer=metrics,
    )
    return Pop3Service(
        settings=settings,
        authenticator=authenticator,
        store=runtime.store,
        limits=ConnectionLimits(limits.max_connections, limits.max_connections_per_ip),
        tls=runtime.tls,
        observer=metrics or NULL_OBSERVER,
        trusted_proxies=config.trusted_proxies,
    )


def _inherit(endpoints: list[Endpoint], sockets: Sequence[socket.socket] | None) -> list[Endpoint]:
    """Endpoints on already-bound sockets (a worker's, in endpoint order), or as they are."""
    if sockets is None:
        return endpoints
    return [replace(e, sock=s) for e, s in zip(endpoints, sockets, strict=True)]


def build_server(
    runtime: Runtime,
    metrics: Metrics | None = None,
    *,
    gate: ConnectionGate | None = None,
    sockets: Sequence[socket.socket] | None = None,
) -> Listener:
    """The POP3 listeners (plain and implicit TLS) for this runtime (``metrics``, if on).

    In a worker, ``gate`` holds the connection counts shared by every worker and
    ``sockets`` are the listening sockets the supervisor bound.
    """
    return Listener(
        _inherit([Endpoint.tcp(address) for address in runtime.config.listen], sockets),
        pop3_service(runtime, metrics),
        tls=runtime.tls,
        observer=metrics,
        gate=gate,
    )


def build_delivery_agent(
    config: Config,
    users: UsersFile,
    store: Store,
    on_result: Callable[[Outcome], None] | None = None,
) -> DeliveryAgent:
    """The one delivery path shared by LMTP and ``mailbag deliver``."""
    return DeliveryAgent(
        store,
        users,
        hostname=config.hostname or socket.gethostname() or "localhost",
        max_message_size=config.storage.max_message_size,
        quota=QuotaDefaults(config.quota.bytes, config.quota.messages, config.quota.tempfail),
        on_result=on_result,
    )


def delivery_metric(outcome: Outcome) -> str:
    """The ``mailbag_deliveries`` result label for a delivery outcome."""
    if outcome is Outcome.DELIVERED:
        return "delivered"
    return "failed" if outcome is Outcome.TEMPORARY else "rejected"


def lmtp_service(runtime: Runtime, metrics: Metrics | None = None) -> LmtpService:
    """What new LMTP connections get under this runtime (rebuilt at every SIGHUP)."""
    config = runtime.config
    on_result = None
    if metrics is not None:
        count = metrics.delivery

        def on_result(outcome: Outcome) -> None:
            count(delivery_metric(outcome))

    agent = build_delivery_agent(config, runtime.users, runtime.store, on_result)
    policy = LmtpPolicy(hostname=agent.hostname, max_message_size=agent.max_message_size)
    total = config.lmtp.max_connections
    return LmtpService(
        settings=LmtpSessionSettings(policy=policy, timeout=config.lmtp.timeout),
        agent=agent,
        limits=ConnectionLimits(total=total, per_address=total),
        trusted_proxies=config.trusted_proxies,
    )


def build_lmtp_server(
    runtime: Runtime,
    metrics: Metrics | None = None,
    *,
    sockets: Sequence[socket.socket] | None = None,
) -> Listener | None:
    """The LMTP listeners (TCP and Unix socket), or None when none is configured."""
    lmtp = runtime.config.lmtp
    if not lmtp.listen and lmtp.socket is None:
        return None
    endpoints = [Endpoint.tcp(address) for address in lmtp.listen]
    if lmtp.socket is not None:
        endpoints.append(Endpoint(path=lmtp.socket, mode=lmtp.socket_mode))
    return Listener(_inherit(endpoints, sockets), lmtp_service(runtime, metrics), backlog=256)

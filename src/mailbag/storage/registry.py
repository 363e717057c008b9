"""Storage backends by name, so that nothing above storage names a concrete one.

The configuration says ``[storage] backend = "maildir"``; the CLI's wiring
calls ``create_from_settings(backend, common, options)`` and receives a
``Store``.  Session, server and migration code only ever see that interface
(DESIGN.md: backends are created by name from the config).  Built-in backends
are imported lazily, so choosing one never imports the others (a PostgreSQL
backend must not make its driver a dependency of Maildir users); that lazy
import is the one place a module above the backends names them (see the
import-linter contract in pyproject.toml).

Each backend declares the ``[storage]`` keys it takes.  The typed keys every
config has (``common``, e.g. ``maildir``) are passed only to backends that
declare them; any other key in ``[storage]`` (``options``) must be declared
by the chosen backend, or it is a ConfigError naming the key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mailbag.errors import ConfigError
from mailbag.storage.base import Store

StoreFactory = Callable[..., Store]


@dataclass(frozen=True, slots=True)
class Backend:
    """A registered backend: how to build it and which config keys it takes."""

    factory: StoreFactory
    #: ``[storage]`` keys passed to ``factory`` as keywords; None: only explicit options.
    settings: frozenset[str] | None = None


_backends: dict[str, Backend] = {}


def register(
    name: str,
    factory: StoreFactory,
    *,
    settings: Iterable[str] | None = None,
    replace: bool = False,
) -> None:
    """Make ``factory`` available as ``name``; refuses to shadow by accident.

    ``settings`` are the ``[storage]`` keys the backend takes (passed to the
    factory as keyword arguments when they appear in the config).
    """
    if name in _backends and not replace:
        raise ValueError(f"storage backend {name!r} is already registered")
    _backends[name] = Backend(factory, None if settings is None else frozenset(settings))


def unregister(name: str) -> None:
    """Forget ``name`` (tests that register a backend of their own clean up with this)."""
    _backends.pop(name, None)


def available() -> tuple[str, ...]:
    """Registered backend names, sorted (for ``--help`` and error messages)."""
    return tuple(sorted(_backends))


def _lookup(name: str) -> Backend:
    backend = _backends.get(name)
    if backend is None:
        raise ConfigError(f"storage.backend: unknown backend {name!r}; "
                          f"available: {', '.join(available())}")
    return backend


def create(name: str, /, **options: Any) -> Store:
    """Build the backend called ``name`` with ``options`` (its factory's keywords).

    Unknown names and options the backend does not accept are configuration
    mistakes, reported as ConfigError naming what is wrong.
    """
    backend = _lookup(name)
    try:
        return backend.factory(**options)
    except TypeError as exc:
        raise ConfigError(f"storage backend {name!r}: {exc}") from exc


def create_from_settings(
    name: str, common: Mapping[str, Any], options: Mapping[str, Any]
) -> Store:
    """Build the backend ``name`` from the ``[storage]`` table of a config.

    ``common`` holds the typed keys every config has (with their defaults);
    a backend gets those it declares.  ``options`` holds the other keys the
    file sets; each must be one the backend declares.
    """
    backend = _lookup(name)
    declared = backend.settings if backend.settings is not None else frozenset(options)
    unknown = sorted(set(options) - declared)
    if unknown:
        takes = ", ".join(sorted(declared)) or "none"
        raise ConfigError(f"storage.{unknown[0]}: not a setting of the {name!r} storage backend "
                          f"(its settings: {takes})")
    chosen = {key: value for key, value in common.items() if key in declared}
    chosen.update(options)
    return create(name, **chosen)


def _maildir(*, maildir: str = "mail/{user}/Maildir", **options: Any) -> Store:
    from mailbag.storage.maildir import MaildirStore

    if not isinstance(maildir, str):
        raise ConfigError("storage.maildir: expected a string")
    return MaildirStore(maildir, **options)


def _memory(**options: Any) -> Store:
    from mailbag.storage.memory import MemoryStore

    return MemoryStore(**options)


def _postgres(*, database: Any = None, hostname: Any = "", **options: Any) -> Store:
    """The PostgreSQL backend on the node's shared pool of ``[database]``.

    Its settings live in ``[database]`` (shared with ``auth.backend =
    "postgres"``), which the wiring passes as ``database``; ``hostname``
    goes into the Maildir-style unique names it makes for UIDLs.
    """
    if not isinstance(hostname, str):
        raise ConfigError("storage.hostname: expected a string")
    try:
        from mailbag.database.pool import shared_database, shared_settings
        from mailbag.storage.postgres import PostgresStore, make_node_id
    except ImportError as exc:  # asyncpg is an optional extra
        raise ConfigError(
            f"storage backend 'postgres' needs asyncpg: pip install 'mailbag[postgres]' ({exc})"
        ) from None
    settings = shared_settings(database)
    return PostgresStore(
        database=shared_database(settings),
        lease_time=settings.lease_time,
        node_id=make_node_id(settings.node_name),
        hostname=hostname or None,
        **options,
    )


register("maildir", _maildir, settings=("maildir", "trust_mtimes"))
register("memory", _memory, settings=())
register("postgres", _postgres, settings=("database", "hostname"))

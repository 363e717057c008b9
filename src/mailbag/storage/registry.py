"""Storage backends by name, so that only the CLI picks a concrete one.

The configuration says ``storage = "maildir"``; the CLI calls
``create("maildir", root_template=...)``.  Session and server code receive
a ``Store`` and never import a backend module (DESIGN.md: only the
composition root names concrete backends).  Built-in backends are imported
lazily, so choosing one never imports the others (a future PostgreSQL
backend must not make its driver a dependency of Maildir users).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailbag.errors import ConfigError
from mailbag.storage.base import Store

StoreFactory = Callable[..., Store]

_factories: dict[str, StoreFactory] = {}


def register(name: str, factory: StoreFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``name``; refuses to shadow by accident."""
    if name in _factories and not replace:
        raise ValueError(f"storage backend {name!r} is already registered")
    _factories[name] = factory


def available() -> tuple[str, ...]:
    """Registered backend names, sorted (for ``--help`` and error messages)."""
    return tuple(sorted(_factories))


def create(name: str, /, **options: Any) -> Store:
    """Build the backend called ``name`` with ``options``.

    Unknown names and options the backend does not accept are configuration
    mistakes, reported as ConfigError naming what is wrong.
    """
    factory = _factories.get(name)
    if factory is None:
        raise ConfigError(f"unknown storage backend {name!r}; available: {', '.join(available())}")
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"storage backend {name!r}: {exc}") from exc


def _maildir(**options: Any) -> Store:
    from mailbag.storage.maildir import MaildirStore

    return MaildirStore(**options)


def _memory(**options: Any) -> Store:
    from mailbag.storage.memory import MemoryStore

    return MemoryStore(**options)


def _postgres(**options: Any) -> Store:
    try:
        from mailbag.storage.postgres import PostgresStore
    except ImportError as exc:  # asyncpg is an optional extra
        raise ConfigError(
            f"storage backend 'postgres' needs asyncpg: pip install 'mailbag[postgres]' ({exc})"
        ) from None
    return PostgresStore(**options)


register("maildir", _maildir)
register("memory", _memory)
register("postgres", _postgres)

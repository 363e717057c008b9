"""The PostgreSQL storage backend (``storage.backend = "postgres"``).

``store`` is the ``Store``, ``maildrop`` an open maildrop, ``leases`` the
cross-node lock.  Importing this package imports ``asyncpg``; the registry
does so only when the backend is chosen.
"""

from mailbag.storage.postgres.leases import make_node_id
from mailbag.storage.postgres.store import PostgresStore

__all__ = ["PostgresStore", "make_node_id"]

"""PostgreSQL plumbing shared by the database backends of storage and auth.

A bottom layer, beside ``config`` and ``errors``: the storage backend
(``storage/postgres``) and the users backend (``auth/pg_users``) both need a
connection pool, the same mapping of driver failures onto mailbag's error
families, and one versioned schema, but must not import each other
(DESIGN.md).  Nothing here imports ``asyncpg`` at module level except
``pool``; importing this package costs nothing for Maildir users.
"""

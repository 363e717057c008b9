"""Users in PostgreSQL (``auth.backend = "postgres"``): the users file's data, shared by all nodes.

Each row holds exactly what a users-file line holds (password hash in any
scheme the file accepts, SCRAM-SHA-256 keys, the optional APOP secret,
quotas), made by the same code (``users.make_secrets``), so an account can
move between the two and ``mailbag user ...`` behaves the same on both.

A node caches the rows it looked up (``database.changes``): a trigger
(schema version 4) announces every change of the table with ``NOTIFY``, and
the node forgets its cache when one arrives, so ``mailbag user passwd`` on
any machine is seen by every node at the next login, with no reload.  While
the node is not listening (connection lost, not yet connected) every login
and LMTP recipient check is one indexed query, as without a cache.

Two ways in:

* ``lookup_async`` and friends, on the server's event loop, through the
  node's shared pool (``database.pool``); failures are ``AuthError``, which
  POP3 answers with ``-ERR [SYS/TEMP]`` and LMTP with ``451 4.3.0``.
* The synchronous ``UserDatabase`` methods (``lookup``, ``add``, ...) for
  the CLI and for callers that cannot await (the SCRAM exchange today).
  They run the same coroutines on a private thread with its own loop and a
  one-connection pool, and wait at most ``connect_timeout + command_timeout``.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from mailbag.auth.schemes import DEFAULT_ARGON2_PARAMS, Argon2Params
from mailbag.auth.scram import ScramSecrets
from mailbag.auth.users import (
    UserExists,
    UserRecord,
    check_storable,
    login_candidates,
    make_secrets,
    user_key,
    validate_username,
)
from mailbag.database import schema
from mailbag.database.changes import ChangeFeed, GenerationCache
from mailbag.database.pool import Connection, Database
from mailbag.errors import AuthError, InvalidUsername, UnknownUser

T = TypeVar("T")

_COLUMNS = "key, name, password, scram, apop_secret, quota_bytes, quota_messages"


def _record(row: Any) -> UserRecord:
    scram = None
    if row["scram"]:
        try:
            scram = ScramSecrets.from_field(row["scram"])
        except AuthError:
            scram = None  # an unusable SCRAM field: SCRAM fails, passwords still work
    return UserRecord(
        row["name"],
        row["password"],
        scram,
        row["apop_secret"],
        None if row["quota_bytes"] is None else int(row["quota_bytes"]),
        None if row["quota_messages"] is None else int(row["quota_messages"]),
    )


class _LoopThread:
    """A private event loop on a daemon thread, for the synchronous methods."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="mailbag-pg-users",
                                 daemon=True).start()
                self._loop = loop
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise AuthError("database: users query timed out") from None


class PostgresUsers:
    """The ``users`` table as a ``UserDatabase`` with the admin methods of ``UsersFile``."""

    def __init__(
        self,
        dsn: str = "",
        *,
        database: Database | None = None,
        default_domain: str | None = None,
        argon2_params: Argon2Params = DEFAULT_ARGON2_PARAMS,
        scram_iterations: int = 4096,
    ) -> None:
        if database is None:
            if not dsn:
                raise AuthError("auth.backend = \"postgres\" needs [database] dsn")
            database = Database(dsn, min_size=1, max_size=4, error=AuthError)
        self.db = database
        self.default_domain = default_domain
        self.argon2_params = argon2_params
        self.scram_iterations = scram_iterations
        #: The users file reports unparsable lines here; the database has none.
        self.problems: tuple[str, ...] = ()
        self._sync_db = Database(
            database.dsn,
            min_size=0,
            max_size=1,
            connect_timeout=database.connect_timeout,
            command_timeout=database.command_timeout,
            error=AuthError,
        )
        self._thread = _LoopThread()
        #: Records by login (None: no such user) for the server's lookups.
        self._cache: GenerationCache[str, UserRecord | None] = GenerationCache(
            ChangeFeed(database, "mailbag_users"))

    def __repr__(self) -> str:
        return f"PostgresUsers(default_domain={self.default_domain!r})"

    # -- async API (the server) -------------------------------------------------

    async def check_schema(self) -> None:
        """Refuse to serve with a schema that is behind or ahead."""
        await schema.require_current(self.db)

    async def close(self) -> None:
        """Stop listening and close the shared pool (at shutdown)."""
        await self._cache.feed.close()
        await self.db.close()

    async def lookup_async(self, login: str, *, db: Database | None = None) -> UserRecord | None:
        """The record ``login`` names (exact name first, then via the default domain)."""
        try:
            login = validate_username(login)
        except InvalidUsername:
            return None
        token = None
        if db is None:  # the server's lookups; the CLI's always ask
            found, cached = self._cache.get(login)
            if found:
                return cached
            token = self._cache.token()
        keys = [user_key(c) for c in login_candidates(login, self.default_domain)]
        async with (db or self.db).connection("look up a user", error=AuthError) as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM users WHERE key = ANY($1::text[])", keys
            )
        by_key = {row["key"]: row for row in rows}
        record = next((_record(by_key[key]) for key in keys if key in by_key), None)
        self._cache.put(login, record, token)
        return record

    async def list_async(self, *, db: Database | None = None) -> builtins.list[UserRecord]:
        """Every user, in the order they were added."""
        async with (db or self.db).connection("list users", error=AuthError) as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM users ORDER BY created_at, key")
        return [_record(row) for row in rows]

    # -- synchronous API (CLI; UserDatabase) --------------------------------------

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._thread.run(coro, self.db.connect_timeout + self.db.command_timeout)

    def lookup(self, login: str) -> UserRecord | None:
        """Blocking ``lookup_async`` (one query) for callers that cannot await."""
        return self._sync(self.lookup_async(login, db=self._sync_db))

    def list(self) -> builtins.list[UserRecord]:
        """Every user, in the order they were added."""
        return self._sync(self.list_async(db=self._sync_db))

    def reload(self) -> None:
        """Nothing to re-read: every lookup queries the database."""

    async def _write(self, action: str, sql: str, *args: Any) -> str:
        async with self._sync_db.transaction(action, error=AuthError) as conn:
            status: str = await conn.execute(sql, *args)
            return status

    async def _fetch_one(self, name: str) -> UserRecord:
        async with self._sync_db.connection("read a user", error=AuthError) as conn:
            row = await _one(conn, name)
        if row is None:
            raise UnknownUser(f"no user {name!r} in the database")
        return _record(row)

    def add(
        self,
        name: str,
        password: str,
        *,
        scheme: str = "ARGON2ID",
        with_scram: bool = True,
        apop_secret: str | None = None,
        params: Argon2Params | None = None,
    ) -> UserRecord:
        """Create a user; ``UserExists`` if the name (domain case-insensitive) is taken."""
        name = validate_username(name)
        stored, scram, apop = make_secrets(
            password, scheme, with_scram=with_scram, apop_secret=apop_secret,
            argon2_params=params or self.argon2_params, scram_iterations=self.scram_iterations,
        )
        status = self._sync(self._write(
            "add a user",
            "INSERT INTO users (key, name, password, scram, apop_secret)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING",
            user_key(name), name, stored, scram, apop,
        ))
        if status.endswith(" 0"):
            raise UserExists(f"user {name!r} already exists in the database")
        return self._sync(self._fetch_one(name))

    def _update(self, name: str, sets: str, *args: Any) -> UserRecord:
        name = validate_username(name)
        status = self._sync(self._write(
            "update a user",
            f"UPDATE users SET {sets}, updated_at = now() WHERE key = $1",
            user_key(name), *args,
        ))
        if status.endswith(" 0"):
            raise UnknownUser(f"no user {name!r} in the database")
        return self._sync(self._fetch_one(name))

    def set_password(
        self,
        name: str,
        password: str,
        *,
        scheme: str = "ARGON2ID",
        with_scram: bool = True,
        apop_secret: str | None = None,
        params: Argon2Params | None = None,
    ) -> UserRecord:
        """Replace the password, the SCRAM keys and the APOP secret (removed when None)."""
        stored, scram, apop = make_secrets(
            password, scheme, with_scram=with_scram, apop_secret=apop_secret,
            argon2_params=params or self.argon2_params, scram_iterations=self.scram_iterations,
        )
        return self._update(
            name, "password = $2, scram = $3, apop_secret = $4", stored, scram, apop
        )

    def set_apop_secret(self, name: str, secret: str | None) -> UserRecord:
        """Set (or with None, remove) the plaintext APOP secret."""
        if secret is not None:
            check_storable("the APOP secret", secret, allow_colon=True)
        return self._update(name, "apop_secret = $2", secret or None)

    def set_quota(
        self, name: str, bytes: int | None = None, messages: int | None = None
    ) -> UserRecord:
        """Set both limits; None means no limit of its own (``[quota]`` applies)."""
        for value in (bytes, messages):
            if value is not None and (isinstance(value, bool) or value < 0):
                raise AuthError(f"quota must be a non-negative integer, not {value!r}")
        return self._update(name, "quota_bytes = $2, quota_messages = $3", bytes, messages)

    def delete(self, name: str) -> None:
        """Remove the user; ``UnknownUser`` if there is none.  Its mail is untouched."""
        name = validate_username(name)
        status = self._sync(self._write(
            "delete a user", "DELETE FROM users WHERE key = $1", user_key(name)
        ))
        if status.endswith(" 0"):
            raise UnknownUser(f"no user {name!r} in the database")


async def _one(conn: Connection, name: str) -> Any:
    return await conn.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE key = $1", user_key(name))

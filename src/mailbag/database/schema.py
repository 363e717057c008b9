"""The versioned database schema: ordered migrations, applied only on request.

``mailbag db init`` creates the schema and ``mailbag db upgrade`` applies the
migrations a newer mailbag brings; a server never changes the schema by
itself at start-up (an upgrade can lock tables for a while, and with many
nodes the administrator decides when).  A node that finds the schema behind
refuses to start with a message that names the command to run; one that
finds it *ahead* (an older node during a rolling upgrade) also refuses,
because it could misread tables it does not know.

Each migration runs in its own transaction together with the version bump,
under an advisory lock so two administrators upgrading at once cannot apply
one twice.  Migrations are append-only: never edit one that has shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailbag.database.pool import Connection, Database
from mailbag.errors import ConfigError

#: Any constant works; it only has to be the same for every mailbag.
ADVISORY_LOCK_KEY = 0x6D61696C626167  # "mailbag"


@dataclass(frozen=True, slots=True)
class Migration:
    """One step: the version it produces, what it does (for the log), the SQL."""

    version: int
    title: str
    sql: str


_V1 = """
CREATE TABLE maildrops (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    -- Running totals, updated in the transaction that changes messages:
    -- the quota check of a delivery is one row update with a condition.
    messages    bigint NOT NULL DEFAULT 0 CHECK (messages >= 0),
    octets      bigint NOT NULL DEFAULT 0 CHECK (octets >= 0)
);

CREATE TABLE messages (
    maildrop_id bigint NOT NULL REFERENCES maildrops (id) ON DELETE CASCADE,
    -- Arrival order, from one sequence for the whole cluster.
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    -- The Maildir-style unique name chosen at delivery; the UIDL derives from it,
    -- so migrating to Maildir and back keeps every UIDL.
    unique_name text NOT NULL,
    uid         text NOT NULL CHECK (uid ~ '^[\\x21-\\x7e]{1,70}$'),
    stored_size bigint NOT NULL,
    wire_size   bigint NOT NULL,
    chunks      integer NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (maildrop_id, seq),
    UNIQUE (maildrop_id, uid)
);

-- Bodies in fixed-size rows: TOP reads the first row only, RETR streams the
-- rest in batches, and STAT/LIST/UIDL never touch this table.
CREATE TABLE message_chunks (
    maildrop_id bigint NOT NULL,
    seq         bigint NOT NULL,
    n           integer NOT NULL,
    data        bytea NOT NULL,
    PRIMARY KEY (maildrop_id, seq, n),
    FOREIGN KEY (maildrop_id, seq) REFERENCES messages (maildrop_id, seq) ON DELETE CASCADE
);
-- Stored out of line without compression: mail is mostly compressed or
-- base64 already, and RETR should not pay for pglz.
ALTER TABLE message_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

-- The RFC 1939 exclusive-access lock across nodes: one row per open maildrop,
-- owned by a node process and kept alive by that node's single heartbeat.
CREATE TABLE leases (
    maildrop_id bigint PRIMARY KEY REFERENCES maildrops (id) ON DELETE CASCADE,
    node        text NOT NULL,
    token       bigint NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX leases_node ON leases (node);

CREATE TABLE users (
    -- The lookup key: the name with the domain after the last '@' lowercased.
    key            text PRIMARY KEY,
    name           text NOT NULL,
    password       text NOT NULL,
    scram          text,
    apop_secret    text,
    quota_bytes    bigint CHECK (quota_bytes >= 0),
    quota_messages bigint CHECK (quota_messages >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
"""

_V2 = """
-- Store.import_messages (mailbag migrate): what each source key became, kept
-- after the message is deleted, so a re-run neither stores it twice nor
-- brings back what a client deleted since.  No foreign key to messages for
-- that reason; ``seq`` tells whether the message is still there.
CREATE TABLE imported_keys (
    maildrop_id bigint NOT NULL REFERENCES maildrops (id) ON DELETE CASCADE,
    key         text NOT NULL,
    seq         bigint NOT NULL,
    -- True when the UIDL was given by the source (not chosen by mailbag).
    kept        boolean NOT NULL,
    PRIMARY KEY (maildrop_id, key)
);

-- Every UIDL import ever served in a maildrop (also after deletion and after
-- a --replace-uidls), so no later message of that maildrop is given one.
CREATE TABLE reserved_uids (
    maildrop_id bigint NOT NULL REFERENCES maildrops (id) ON DELETE CASCADE,
    uid         text NOT NULL,
    PRIMARY KEY (maildrop_id, uid)
);
"""

_V3 = """
-- The login defence shared by every node (session.defence_state): failure
-- counters per key (address, account, account+network) and, per account, the
-- networks it logged in from.  Expiry is by database time, so nodes agree.
CREATE TABLE auth_failures (
    key      text PRIMARY KEY,
    failures integer NOT NULL,
    last_at  timestamptz NOT NULL
);
CREATE INDEX auth_failures_last_at ON auth_failures (last_at);

CREATE TABLE known_networks (
    account   text NOT NULL,
    network   text NOT NULL,
    last_seen timestamptz NOT NULL,
    PRIMARY KEY (account, network)
);
CREATE INDEX known_networks_last_seen ON known_networks (last_seen);
"""

_V4 = """
-- Every change of a user (any node, the CLI, plain SQL) is announced on the
-- channel mailbag_users when its transaction commits, so nodes may cache
-- users and still see a change at once (database.changes).
CREATE FUNCTION mailbag_users_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mailbag_users', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION mailbag_users_changed();
"""

_V5 = """
-- Leases are taken and released by updating one long-lived row per maildrop
-- instead of an INSERT and a DELETE per POP3 session (storage.postgres.leases):
-- no dead row and no index entry per session, no foreign-key check per open
-- (it runs only when a row is inserted, on a maildrop's first open), and the
-- update stays on its page (HOT) because no indexed column changes.  So the
-- index on node goes (the heartbeat and releases find rows by maildrop_id),
-- and pages are left half empty for the new row versions.  A released row
-- has expires_at = '-infinity'; generation counts the takings, so an open can
-- tell whether anyone held the maildrop since its snapshot.
DROP INDEX leases_node;
ALTER TABLE leases ADD COLUMN generation bigint NOT NULL DEFAULT 0;
ALTER TABLE leases SET (fillfactor = 50);

-- Goes up in the transaction of every change to the maildrop's messages
-- (delivery, deletion, import), with the running totals: a node that kept
-- the list it read at version N reuses it while the version is still N
-- (storage.postgres.listings), instead of reading every message's row.
ALTER TABLE maildrops ADD COLUMN version bigint NOT NULL DEFAULT 0;
"""

#: Every migration, in order; version N is ``MIGRATIONS[N - 1]``.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "maildrops, messages, chunked bodies, leases, users", _V1),
    Migration(2, "imported keys and reserved UIDLs (mailbag migrate)", _V2),
    Migration(3, "login defence shared by every node: failure counters, known networks", _V3),
    Migration(4, "users announce their changes (NOTIFY mailbag_users) for node caches", _V4),
    Migration(5, "leases updated in place (one row per maildrop, HOT); maildrop versions", _V5),
)

LATEST = MIGRATIONS[-1].version


class SchemaMismatch(ConfigError):
    """The database schema is not the one this mailbag needs (behind or ahead)."""


async def current_version(conn: Connection) -> int:
    """The applied version; 0 for a database mailbag has never initialised."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT max(version) FROM schema_version")
    return int(version or 0)


async def version(db: Database) -> int:
    """``current_version`` through a pooled connection."""
    async with db.connection("read the schema version") as conn:
        return await current_version(conn)


async def upgrade(db: Database, *, target: int = LATEST) -> tuple[int, int]:
    """Apply the pending migrations up to ``target``; return (before, after)."""
    async with db.connection("upgrade the schema") as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        try:
            before = await current_version(conn)
            if before > LATEST:
                raise SchemaMismatch(_ahead(before))
            for migration in MIGRATIONS[before:target]:
                async with conn.transaction():
                    await conn.execute("SET LOCAL synchronous_commit = on")  # see database.pool
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_version ("
                        " version integer PRIMARY KEY,"
                        " title text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_version (version, title) VALUES ($1, $2)",
                        migration.version,
                        migration.title,
                    )
            return before, max(before, target)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)


def _ahead(found: int) -> str:
    return (
        f"database schema is version {found}, newer than this mailbag knows ({LATEST}); "
        "upgrade mailbag on this node"
    )


def problem(found: int) -> str | None:
    """What is wrong with schema version ``found`` for this mailbag, or None."""
    if found == 0:
        return "the database has no mailbag schema; run `mailbag db init`"
    if found < LATEST:
        return (
            f"database schema is version {found}, this mailbag needs {LATEST}; "
            "run `mailbag db upgrade`"
        )
    if found > LATEST:
        return _ahead(found)
    return None


async def require_current(db: Database) -> None:
    """Raise ``SchemaMismatch`` unless the schema is exactly ``LATEST`` (start-up check)."""
    message = problem(await version(db))
    if message is not None:
        raise SchemaMismatch(message)

"""``mailbag db init|upgrade|status``: the PostgreSQL schema, applied on request only.

Servers never change the schema by themselves (``database.schema`` says
why); these commands do, once, for the whole cluster.  Each needs
``[database] dsn`` in the config and a role allowed to create tables.
"""

from __future__ import annotations

import argparse
import asyncio

from mailbag.cli.common import add_config_option, config_from_args
from mailbag.config import Config
from mailbag.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``db`` command group."""
    parser = subparsers.add_parser(
        "db",
        help="create or upgrade the PostgreSQL schema",
        description="Manage the PostgreSQL schema used by storage.backend = \"postgres\" and "
        "auth.backend = \"postgres\" (the [database] section of the config).",
    )
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for name, text in (
        ("init", "create the schema in an empty database"),
        ("upgrade", "apply the migrations this mailbag brings (safe to repeat)"),
        ("status", "show the schema version; exit status 1 unless it is current"),
    ):
        action = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_config_option(action)
        action.set_defaults(handler=run, db_action=name)


async def _run(config: Config, action: str) -> tuple[str, bool]:
    """Do ``action``; return the line to print and whether all is well."""
    if not config.database.dsn:
        raise ConfigError("database.dsn: not set (see the [database] section of the config)")
    from mailbag.cli.wiring import build_database
    from mailbag.database import schema

    db = build_database(config)
    try:
        found = await schema.version(db)
        if action == "status":
            problem = schema.problem(found)
            state = problem or "current"
            return f"schema version {found} (this mailbag: {schema.LATEST}): {state}", not problem
        if action == "init" and found != 0:
            raise ConfigError(
                f"the database already has a mailbag schema (version {found}); "
                "use `mailbag db upgrade`"
            )
        before, after = await schema.upgrade(db)
        if before == after:
            return f"schema version {after}: already current, nothing to do", True
        return f"schema upgraded from version {before} to {after}", True
    finally:
        await db.close()


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag db ACTION``."""
    config = config_from_args(args)
    line, ok = asyncio.run(_run(config, args.db_action))
    print(line)
    return 0 if ok else 1

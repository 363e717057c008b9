"""`mailbag db init|upgrade|status`, `check` on a database, serve refusing a stale schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbag.cli import serve_cmd
from mailbag.cli.main import main
from mailbag.config import load_config
from mailbag.database.schema import LATEST, SchemaMismatch
from mailbag.errors import ConfigError
from tests.pgtest import fresh_database


def write_config(path: Path, dsn: str, extra: str = "") -> Path:
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\n\n[storage]\nbackend = "postgres"\n\n'
        f'[database]\ndsn = "{dsn}"\npool_min_size = 0\npool_max_size = 2\n{extra}'
    )
    return path


@pytest.fixture
def empty_db() -> Iterator[str]:
    with fresh_database(initialise=False) as dsn:
        yield dsn


def test_db_init_upgrade_status(
    tmp_path: Path, empty_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(write_config(tmp_path / "mailbag.toml", empty_db))
    assert main(["db", "status", "-c", cfg]) == 1
    assert "run `mailbag db init`" in capsys.readouterr().out
    assert main(["check", "-c", cfg]) == 1
    assert "FAIL database: the database has no mailbag schema" in capsys.readouterr().out
    assert main(["db", "init", "-c", cfg]) == 0
    assert f"from version 0 to {LATEST}" in capsys.readouterr().out
    assert main(["db", "status", "-c", cfg]) == 0
    assert "current" in capsys.readouterr().out
    assert main(["db", "init", "-c", cfg]) == 1  # never on top of an existing schema
    assert "use `mailbag db upgrade`" in capsys.readouterr().err
    assert main(["db", "upgrade", "-c", cfg]) == 0
    assert "already current" in capsys.readouterr().out
    main(["check", "-c", cfg])
    assert f"ok   database: schema version {LATEST} (current)" in capsys.readouterr().out


def test_serve_refuses_a_database_without_schema(tmp_path: Path, empty_db: str) -> None:
    config = load_config(write_config(tmp_path / "mailbag.toml", empty_db))
    with pytest.raises(SchemaMismatch, match="mailbag db init"):
        asyncio.run(serve_cmd.serve(config))


def test_postgres_backend_needs_a_dsn(tmp_path: Path) -> None:
    path = tmp_path / "mailbag.toml"
    path.write_text('[storage]\nbackend = "postgres"\n')
    with pytest.raises(ConfigError, match=r"database\.dsn"):
        load_config(path)


def test_unreachable_database_is_reported_by_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path / "mailbag.toml", "postgresql://nobody@127.0.0.1:9/none", "connect_timeout = 2.0\n"
    )
    assert main(["check", "-c", str(cfg)]) == 1
    assert "FAIL database: database: cannot" in capsys.readouterr().out

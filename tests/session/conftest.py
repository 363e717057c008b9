"""Fixtures for the session tests: a users file with ``demo``/``demo`` and ``other``/``pw``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbag.auth.users import UsersFile
from tests.conftest import TEST_ARGON2


@pytest.fixture
def users(tmp_path: Path) -> UsersFile:
    db = UsersFile(tmp_path / "users", argon2_params=TEST_ARGON2)
    db.add("demo", "demo")
    db.add("other", "pw")
    return db

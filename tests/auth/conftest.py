"""Fixtures for the auth tests: cheap Argon2 parameters and a users file in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbag.auth.schemes import Argon2Params
from mailbag.auth.users import UsersFile

#: Real Argon2id, but a millisecond instead of ~100 ms per hash.
CHEAP = Argon2Params(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.fixture
def cheap() -> Argon2Params:
    return CHEAP


@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    return tmp_path / "users"


@pytest.fixture
def users(users_path: Path) -> UsersFile:
    return UsersFile(users_path, default_domain="example.org", argon2_params=CHEAP)

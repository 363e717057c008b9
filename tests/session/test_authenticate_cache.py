"""The authenticator with its cache: Argon2 once per password, never for a cached one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailbag.auth.cache import VerificationCache
from mailbag.auth.schemes import Argon2Params
from mailbag.auth.users import UsersFile
from mailbag.session import authenticate as authenticate_module
from mailbag.session.authenticate import Authenticator
from mailbag.session.throttle import FailureThrottle

CHEAP = Argon2Params(1, 1024, 1)


class Observer:
    def __init__(self) -> None:
        self.results: list[str] = []

    def auth_cache(self, result: str) -> None:
        self.results.append(result)


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts real hash verifications (the expensive part the cache saves)."""
    calls: list[str] = []
    real = authenticate_module.verify_password

    def counting(password: str, stored: str) -> bool:
        calls.append(password)
        return real(password, stored)

    monkeypatch.setattr(authenticate_module, "verify_password", counting)
    return calls


def make(tmp_path: Path, ttl: float = 300.0) -> tuple[Authenticator, UsersFile, Observer]:
    users = UsersFile(tmp_path / "users", argon2_params=CHEAP)
    users.add("demo", "demo")
    observer = Observer()
    auth = Authenticator(
        users, FailureThrottle(base=0.0, cap=0.0), cache=VerificationCache(ttl), observer=observer
    )
    return auth, users, observer


def check(auth: Authenticator, password: str) -> str | None:
    return asyncio.run(auth.check_password("demo", password, "127.0.0.1")).user


def test_auth_cache_second_login_skips_the_hash(tmp_path: Path, verifications: list[str]) -> None:
    auth, _, observer = make(tmp_path)
    assert check(auth, "demo") == "demo"
    assert check(auth, "demo") == "demo"
    assert check(auth, "demo") == "demo"
    assert verifications == ["demo"]
    assert observer.results == ["miss", "hit", "hit"]


def test_auth_cache_failures_always_verify_and_are_never_cached(
    tmp_path: Path, verifications: list[str]
) -> None:
    auth, _, _ = make(tmp_path)
    assert check(auth, "wrong") is None
    assert check(auth, "wrong") is None
    assert verifications == ["wrong", "wrong"]
    assert len(auth.cache) == 0


def test_auth_cache_password_change_applies_at_the_next_login(
    tmp_path: Path, verifications: list[str]
) -> None:
    auth, users, _ = make(tmp_path)
    assert check(auth, "demo") == "demo"
    users.set_password("demo", "new-password")  # what `mailbag user passwd` does
    assert check(auth, "demo") is None
    assert check(auth, "new-password") == "demo"
    assert check(auth, "new-password") == "demo"
    assert verifications == ["demo", "demo", "new-password"]


def test_auth_cache_deleted_user_refused_at_once(tmp_path: Path) -> None:
    auth, users, _ = make(tmp_path)
    assert check(auth, "demo") == "demo"
    users.delete("demo")
    assert check(auth, "demo") is None


def test_auth_cache_off_verifies_every_time(tmp_path: Path, verifications: list[str]) -> None:
    auth, _, observer = make(tmp_path, ttl=0.0)
    assert check(auth, "demo") == check(auth, "demo") == "demo"
    assert verifications == ["demo", "demo"] and observer.results == []

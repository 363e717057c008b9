"""libsodium's Argon2 verification agrees with argon2-cffi wherever it is used."""

from __future__ import annotations

import argon2
import pytest

from mailbag.auth import sodium
from mailbag.auth.schemes import verify_password

pytestmark = pytest.mark.skipif(not sodium.available(), reason="libsodium not installed")


@pytest.mark.parametrize("type_", [argon2.Type.ID, argon2.Type.I])
@pytest.mark.parametrize("password", ["secret", "pässwörd", "with\x00nul", ""])
def test_single_lane_hashes_verify_the_same_through_libsodium(
    type_: argon2.Type, password: str
) -> None:
    hasher = argon2.PasswordHasher(time_cost=3, memory_cost=64, parallelism=1, type=type_)
    data = hasher.hash(password)
    params = argon2.extract_parameters(data)
    assert sodium.eligible(data, params)
    assert sodium.verify(data, password.encode(), params) is True
    assert sodium.verify(data, (password + "x").encode(), params) is False
    scheme = "ARGON2ID" if type_ is argon2.Type.ID else "ARGON2I"
    assert verify_password(password, f"{{{scheme}}}{data}")
    assert not verify_password(password + "x", f"{{{scheme}}}{data}")


@pytest.mark.parametrize(
    "hasher",
    [
        argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=4),  # multi-lane
        argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1, hash_len=80),  # long
        argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1, type=argon2.Type.I),
    ],
)
def test_other_hashes_stay_with_argon2_cffi(hasher: argon2.PasswordHasher) -> None:
    data = hasher.hash("secret")
    assert sodium.verify(data, b"secret", argon2.extract_parameters(data)) is None
    scheme = "ARGON2I" if data.startswith("$argon2i$") else "ARGON2ID"
    assert verify_password("secret", f"{{{scheme}}}{data}")
    assert not verify_password("secreT", f"{{{scheme}}}{data}")

"""Password schemes: every readable scheme right/wrong, SHA-crypt vectors, Dovecot interop."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import time
import warnings

import argon2
import bcrypt
import pytest

from mailbag.auth.schemes import (
    DEFAULT_ARGON2_PARAMS,
    WRITABLE_SCHEMES,
    Argon2Params,
    hash_password,
    is_fast_scheme,
    needs_rehash,
    sha_crypt,
    split_scheme,
    verify_dummy,
    verify_password,
)
from mailbag.errors import AuthError

from .conftest import CHEAP

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt as _crypt  # removed in Python 3.13
except ImportError:  # pragma: no cover - depends on the Python version
    _crypt = None  # type: ignore[assignment]

DOVEADM = shutil.which("doveadm")

# Drepper's SHA-crypt specification, "Test vectors" (also in glibc, php-src, passlib).
SHA_CRYPT_VECTORS = [
    ("$5$saltstring", "Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    (
        "$5$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
    (
        "$5$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5",
    ),
    (
        "$5$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1",
    ),
    (
        "$5$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC",
    ),
    (
        "$6$saltstring",
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoE"
        "OfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8v"
        "OuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1"
        "yxdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        "$6$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66"
        "x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
    (
        "$6$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4"
        "ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
]


def _digest_b64(algo: str, data: bytes) -> str:
    return base64.b64encode(hashlib.new(algo, data).digest()).decode()


def _reference_hashes(password: str) -> dict[str, str]:
    """Hashes of ``password`` made by other libraries, in Dovecot notation."""
    pw = password.encode()
    salt = b"\x01\x02\x03\x04salt"
    ssha512 = base64.b64encode(hashlib.sha512(pw + salt).digest() + salt).decode()
    ssha256 = base64.b64encode(hashlib.sha256(pw + salt).digest() + salt).decode()
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    hasher_i = argon2.PasswordHasher(
        time_cost=1, memory_cost=1024, parallelism=1, type=argon2.Type.I
    )
    return {
        "argon2id": "{ARGON2ID}" + hasher.hash(pw),
        "argon2i": "{ARGON2I}" + hasher_i.hash(pw),
        "bcrypt-2b": "{BLF-CRYPT}" + bcrypt.hashpw(pw, bcrypt.gensalt(4)).decode(),
        "bcrypt-2y": "{BLF-CRYPT}"
        + bcrypt.hashpw(pw, bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$"),
        "bcrypt-2a": "{BLF-CRYPT}" + bcrypt.hashpw(pw, bcrypt.gensalt(4, prefix=b"2a")).decode(),
        "sha512-crypt": "{SHA512-CRYPT}" + sha_crypt(pw, "$6$abcdefgh"),
        "sha256-crypt": "{SHA256-CRYPT}" + sha_crypt(pw, "$5$rounds=2000$abcdefgh"),
        "ssha512": "{SSHA512}" + ssha512,
        "ssha256": "{SSHA256}" + ssha256,
        "sha512": "{SHA512}" + _digest_b64("sha512", pw),
        "sha256": "{SHA256}" + _digest_b64("sha256", pw),
        "sha512-hex": "{SHA512.HEX}" + hashlib.sha512(pw).hexdigest(),
        "sha256-b64": "{SHA256.B64}" + _digest_b64("sha256", pw),
        "sha256-hex-autodetect": "{SHA256}" + hashlib.sha256(pw).hexdigest(),
        "sha1": "{SHA}" + _digest_b64("sha1", pw),
        "plain-md5": "{PLAIN-MD5}" + hashlib.md5(pw).hexdigest(),
        "plain": "{PLAIN}" + password,
        "cleartext": "{CLEARTEXT}" + password,
        "plain-b64": "{PLAIN.B64}" + base64.b64encode(pw).decode(),
        "lowercase-scheme": "{sha256}" + _digest_b64("sha256", pw),
        "crypt-sha512": "{CRYPT}" + sha_crypt(pw, "$6$abcdefgh"),
        "unprefixed-sha512": sha_crypt(pw, "$6$abcdefgh"),
        "unprefixed-sha256": sha_crypt(pw, "$5$abcdefgh"),
        "unprefixed-bcrypt": bcrypt.hashpw(pw, bcrypt.gensalt(4)).decode(),
        "unprefixed-argon2id": hasher.hash(pw),
    }


REFERENCE = _reference_hashes("correct horse ✓")


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_verify_password_right_password(kind: str) -> None:
    assert verify_password("correct horse ✓", REFERENCE[kind]) is True


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_only_single_digest_and_plain_schemes_are_fast(kind: str) -> None:
    """Fast schemes are verified inline by the session; the rest must go to a thread."""
    slow = any(word in kind for word in ("crypt", "unprefixed", "argon", "scram"))
    assert is_fast_scheme(REFERENCE[kind]) is not slow


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_verify_password_wrong_password(kind: str) -> None:
    assert verify_password("correct horse x", REFERENCE[kind]) is False
    assert verify_password("", REFERENCE[kind]) is False


@pytest.mark.parametrize("setting,password,expected", SHA_CRYPT_VECTORS)
def test_sha_crypt_spec_vectors(setting: str, password: str, expected: str) -> None:
    assert sha_crypt(password.encode(), setting) == expected
    scheme = "SHA512-CRYPT" if expected.startswith("$6$") else "SHA256-CRYPT"
    assert verify_password(password, f"{{{scheme}}}{expected}")
    assert not verify_password(password + "!", f"{{{scheme}}}{expected}")


def test_sha_crypt_empty_salt() -> None:
    # php-src's extra vector: an empty salt is legal.
    expected = (
        "$6$$QMXjqd7rHQZPQ1yHsXkQqC1FBzDiVfTHXL.LaeDAeVV.IzMaV9VU4MQ8kPuZa2SOP1A0RPm772EaFYjpEJtdu."
    )
    assert sha_crypt(b"foo", "$6$$bar$") == expected


@pytest.mark.skipif(_crypt is None, reason="crypt module not available (Python >= 3.13)")
@pytest.mark.parametrize("prefix", ["$5$", "$6$", "$5$rounds=1234$", "$6$rounds=1001$"])
@pytest.mark.parametrize("password", ["", "x", "pässwörd", "a" * 70])
def test_sha_crypt_matches_libc_crypt(prefix: str, password: str) -> None:
    setting = prefix + "Zx9./salty"
    assert sha_crypt(password.encode(), setting) == _crypt.crypt(password, setting)


@pytest.mark.parametrize(
    "stored", ["{MD4}abc", "{NTLM}0123", "{FOO.HEX}00", "{}x", "{ARGON2ID.HEX}$argon2id$"]
)
def test_verify_password_unknown_scheme_raises_auth_error(stored: str) -> None:
    with pytest.raises(AuthError) as info:
        verify_password("x", stored)
    scheme = stored[1 : stored.index("}")].split(".")[0].upper()
    assert scheme in str(info.value)


@pytest.mark.parametrize(
    "stored",
    [
        "{SHA256}not base64!",
        "{SHA256}" + base64.b64encode(b"short").decode(),
        "{SSHA512}" + base64.b64encode(b"x" * 10).decode(),
        "{ARGON2ID}$argon2id$garbage",
        "{ARGON2ID}plainly-not-argon",
        "{BLF-CRYPT}$2b$04$garbage",
        "{SHA512-CRYPT}$5$abc$def",
        "{SHA512-CRYPT}$6$rounds=x$salt$hash",
        "{SHA512-CRYPT}$6$salt$tooshort",
        "{SCRAM-SHA-256}4096,notb64!,x,y",
        "abcDEFgh12345",  # unprefixed DES crypt: not supported
        "$1$saltsalt$hash",  # unprefixed MD5-crypt: not supported
    ],
)
def test_verify_password_malformed_hash_raises_auth_error(stored: str) -> None:
    with pytest.raises(AuthError):
        verify_password("x", stored)


@pytest.mark.parametrize("stored", ["", "{PLAIN}", "{ARGON2ID}"])
def test_verify_password_empty_hash_never_matches(stored: str) -> None:
    assert verify_password("", stored) is False
    assert verify_password("x", stored) is False


@pytest.mark.parametrize("scheme", sorted(WRITABLE_SCHEMES))
def test_hash_password_round_trip(scheme: str) -> None:
    stored = hash_password("s3cret ü", scheme, argon2_params=CHEAP, bcrypt_rounds=4)
    assert stored.upper().startswith("{" + scheme + "}")
    assert verify_password("s3cret ü", stored)
    assert not verify_password("s3cret u", stored)


@pytest.mark.parametrize("scheme", ["SHA256.HEX", "SSHA512.B64", "PLAIN.HEX", "PLAIN.BASE64"])
def test_hash_password_encoding_suffix_round_trip(scheme: str) -> None:
    stored = hash_password("pw:with colon", scheme)
    assert verify_password("pw:with colon", stored)
    assert ":" not in split_scheme(stored)[2]


def test_hash_password_salts_differ() -> None:
    assert hash_password("x", "SSHA256") != hash_password("x", "SSHA256")


def test_hash_password_default_is_argon2id_rfc9106_low_memory() -> None:
    profile = argon2.profiles.RFC_9106_LOW_MEMORY
    params = DEFAULT_ARGON2_PARAMS
    assert (params.time_cost, params.memory_cost, params.parallelism) == (
        profile.time_cost,
        profile.memory_cost,
        profile.parallelism,
    )
    assert (params.hash_len, params.salt_len) == (profile.hash_len, profile.salt_len)
    stored = hash_password("x", argon2_params=CHEAP)
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=1024,t=1,p=1$")


@pytest.mark.parametrize("scheme", ["SHA", "PLAIN-MD5", "NOPE", "CRYPT", "ARGON2ID.HEX"])
def test_hash_password_refused_scheme_raises_auth_error(scheme: str) -> None:
    with pytest.raises(AuthError):
        hash_password("x", scheme)


def test_hash_password_bcrypt_long_password_refused() -> None:
    with pytest.raises(AuthError, match="72"):
        hash_password("x" * 73, "BLF-CRYPT", bcrypt_rounds=4)


def test_verify_password_bcrypt_long_password_truncated_like_crypt() -> None:
    stored = "{BLF-CRYPT}" + bcrypt.hashpw(b"y" * 72, bcrypt.gensalt(4)).decode()
    assert verify_password("y" * 72 + "ignored", stored)


def test_hash_password_sha_crypt_rounds() -> None:
    stored = hash_password("x", "SHA256-CRYPT", sha_crypt_rounds=1500)
    assert stored.startswith("{SHA256-CRYPT}$5$rounds=1500$")
    assert verify_password("x", stored)


def test_needs_rehash_detects_scheme_and_params() -> None:
    assert needs_rehash(hash_password("x", "SHA512-CRYPT"))
    assert needs_rehash(hash_password("x", argon2_params=CHEAP))
    assert not needs_rehash(hash_password("x", argon2_params=CHEAP), argon2_params=CHEAP)
    assert not needs_rehash("{SHA256}abc", "SHA256")
    assert not needs_rehash(sha_crypt(b"x", "$6$ab"), "SHA512-CRYPT")


def test_verify_dummy_takes_as_long_as_a_real_verification() -> None:
    params = Argon2Params(time_cost=2, memory_cost=8192, parallelism=1)
    stored = hash_password("right", argon2_params=params)
    verify_dummy("warm-up", params)  # the dummy hash for custom params is made once

    def timed(fn: object) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            best = min(best, time.perf_counter() - start)
        return best

    real = timed(lambda: verify_password("wrong", stored))
    dummy = timed(lambda: verify_dummy("wrong", params))
    assert dummy > real / 3  # same order of magnitude: no fast path for unknown users
    verify_dummy("anything")  # default parameters: the precomputed hash


def test_split_scheme_forms() -> None:
    assert split_scheme("{sha256.hex}ab") == ("SHA256", "HEX", "ab")
    assert split_scheme("$6$x$y") == ("CRYPT", None, "$6$x$y")
    assert split_scheme("{SCRAM-SHA-256}1,a,b,c") == ("SCRAM-SHA-256", None, "1,a,b,c")


@pytest.mark.skipif(DOVEADM is None, reason="Dovecot's doveadm is not installed")
@pytest.mark.parametrize(
    "scheme",
    [
        "SHA512-CRYPT",
        "SHA256-CRYPT",
        "BLF-CRYPT",
        "ARGON2ID",
        "ARGON2I",
        "SSHA512",
        "SSHA256",
        "SHA512",
        "SHA256",
        "SHA512.HEX",
        "PLAIN",
        "CLEARTEXT",
        "CRYPT",
        "SCRAM-SHA-256",
        "SSHA",
        "PLAIN-MD5",
    ],
)
def test_verify_password_reads_doveadm_hashes(scheme: str) -> None:
    assert DOVEADM is not None
    args = [DOVEADM, "pw", "-s", scheme, "-p", "dove pw ✓"]
    if scheme == "BLF-CRYPT":
        args += ["-r", "4"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=30)
    stored = out.stdout.strip()
    assert verify_password("dove pw ✓", stored)
    assert not verify_password("dove pw", stored)


@pytest.mark.skipif(DOVEADM is None, reason="Dovecot's doveadm is not installed")
@pytest.mark.parametrize(
    "scheme", ["SHA512-CRYPT", "SHA256-CRYPT", "SSHA512", "SHA256.HEX", "PLAIN.B64", "ARGON2ID"]
)
def test_hash_password_verified_by_doveadm(scheme: str) -> None:
    assert DOVEADM is not None
    stored = hash_password("dove pw ✓", scheme, argon2_params=CHEAP)
    ok = subprocess.run([DOVEADM, "pw", "-t", stored, "-p", "dove pw ✓"], capture_output=True)
    bad = subprocess.run([DOVEADM, "pw", "-t", stored, "-p", "nope"], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0

"""Argon2 verification through the system's libsodium: the same answers, sooner.

Why: Argon2 is what limits logins per second, and argon2-cffi's bundled
libargon2 is the portable build.  libsodium (what Dovecot's ``doveadm pw``
and its auth process use) has vectorised code: on the benchmark machine it
verifies an m=64 MiB, t=3, p=1 hash in about 0.14 s of one core where
argon2-cffi takes 0.22 s.  Same parameters, same security, more logins.

Safety: libsodium's verify returns -1 both for "wrong password" and for
"cannot handle this string", so only hashes it certainly handles are sent
here (``eligible``); everything else stays on argon2-cffi.  A self-test at
load time (a right and a wrong password against a known hash) disables this
path if the library answers wrongly, and a missing library just means
argon2-cffi everywhere.  ctypes releases the GIL during the call, as cffi
does, so verification still runs in parallel in the authenticator's threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import argon2

#: crypto_pwhash_STRBYTES is 128 including the terminating NUL.
MAX_HASH_STRING = 127

_SELF_TEST_HASH = b"$argon2id$v=19$m=8,t=1,p=1$vZt2qADYyo0$JJiMVIJUtznKR7naqq6BGQ"
_SELF_TEST_PASSWORD = b"mailbag libsodium self-test"

_Verify = Callable[[bytes, bytes, int], int]


@functools.cache
def _library_verify() -> _Verify | None:
    """``crypto_pwhash_str_verify`` from libsodium, or None if absent or misbehaving."""
    name = ctypes.util.find_library("sodium")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        if lib.sodium_init() < 0:
            return None
        verify = lib.crypto_pwhash_str_verify
    except (OSError, AttributeError):
        return None
    verify.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong]
    verify.restype = ctypes.c_int
    good, bad = _SELF_TEST_PASSWORD, _SELF_TEST_PASSWORD[:-1] + b"T"
    if verify(_SELF_TEST_HASH, good, len(good)) != 0:
        return None
    if verify(_SELF_TEST_HASH, bad, len(bad)) != -1:
        return None
    return verify


def available() -> bool:
    """True when libsodium was found and passed the self-test."""
    return _library_verify() is not None


def eligible(data: str, params: argon2.Parameters) -> bool:
    """True for hash strings libsodium verifies with a meaningful answer.

    Single-lane (p=1, what libsodium and Dovecot produce), Argon2 version
    1.3, within libsodium's string and parameter limits.  Multi-lane hashes
    stay with argon2-cffi, which computes the lanes in parallel threads.
    """
    minimum_passes = 3 if params.type is argon2.Type.I else 1
    return (
        len(data) <= MAX_HASH_STRING
        and data.isascii()
        and params.type in (argon2.Type.ID, argon2.Type.I)
        and params.version == 19
        and params.parallelism == 1
        and params.time_cost >= minimum_passes
        and params.memory_cost >= 8
        and params.salt_len >= 8
        and params.hash_len >= 16
    )


def verify(data: str, password: bytes, params: argon2.Parameters) -> bool | None:
    """True/False from libsodium, or None when this hash must go to argon2-cffi."""
    if not eligible(data, params):
        return None
    function = _library_verify()
    if function is None:
        return None
    return function(data.encode("ascii"), password, len(password)) == 0

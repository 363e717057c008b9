"""Password schemes in Dovecot's ``{SCHEME}data`` notation: hash new passwords, verify old ones.

Reading Dovecot's names lets an existing ``passwd-file`` be moved over unchanged; writing them
lets the file go back.  New passwords get ARGON2ID (RFC 9106) by default.  Everything else is
there to *read* what other systems wrote; the weakest of those (unsalted SHA-1, MD5) can be read
but never written.

Stored values without a ``{SCHEME}`` prefix are read the way Dovecot's passwd-file reads them by
default (``default_pass_scheme = CRYPT``): as a crypt(3) string, recognised by its ``$id$``
(``$argon2id$``, ``$argon2i$``, ``$2a$``/``$2b$``/``$2y$``, ``$5$``, ``$6$``).  Traditional DES,
``$1$`` MD5-crypt and yescrypt are not supported and raise ``AuthError``.

SHA-crypt (``$5$``/``$6$``) is Ulrich Drepper's algorithm, written out here with ``hashlib``
because the ``crypt`` module is deprecated and gone in Python 3.13.

Any problem with the *stored* value (unknown scheme, malformed hash) raises ``AuthError`` for
the logs; a wrong password is just ``False``.  Nothing here ever says which.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import argon2
import bcrypt
from argon2.exceptions import InvalidHashError, VerificationError

from mailbag.auth import sodium
from mailbag.auth.scram import SCRAM_SCHEME, ScramSecrets, make_scram_secrets
from mailbag.errors import AuthError

__all__ = [
    "DEFAULT_ARGON2_PARAMS",
    "DEFAULT_SCHEME",
    "READABLE_SCHEMES",
    "WRITABLE_SCHEMES",
    "Argon2Params",
    "hash_password",
    "is_fast_scheme",
    "needs_rehash",
    "sha_crypt",
    "split_scheme",
    "verify_dummy",
    "verify_password",
]

DEFAULT_SCHEME = "ARGON2ID"


@dataclass(frozen=True)
class Argon2Params:
    """Argon2 cost parameters; the defaults are RFC 9106's "low-memory" second recommendation.

    That profile (t=3, m=64 MiB, p=4) is argon2-cffi's ``RFC_9106_LOW_MEMORY``; a test keeps
    the two equal.  Tests use tiny values to stay fast; production keeps these.
    """

    time_cost: int = 3
    memory_cost: int = 65536  # KiB
    parallelism: int = 4
    hash_len: int = 32
    salt_len: int = 16

    def hasher(self, type_: argon2.Type = argon2.Type.ID) -> argon2.PasswordHasher:
        return argon2.PasswordHasher(
            time_cost=self.time_cost,
            memory_cost=self.memory_cost,
            parallelism=self.parallelism,
            hash_len=self.hash_len,
            salt_len=self.salt_len,
            type=type_,
        )


DEFAULT_ARGON2_PARAMS = Argon2Params()

# Hash of a password nobody can type, under DEFAULT_ARGON2_PARAMS, for verify_dummy.
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$X55HXVsb9YiO0XU8kUlTig"
    "$126oTGGG/e3IJPy+Y/Zxqt7DJURD5s/1lxBibxhpgWM"
)

# scheme -> (hashlib name, salted, default encoding); Dovecot's defaults for each.
_DIGESTS: dict[str, tuple[str, bool, str]] = {
    "SHA512": ("sha512", False, "B64"),
    "SHA256": ("sha256", False, "B64"),
    "SHA": ("sha1", False, "B64"),
    "SHA1": ("sha1", False, "B64"),
    "SSHA512": ("sha512", True, "B64"),
    "SSHA256": ("sha256", True, "B64"),
    "SSHA": ("sha1", True, "B64"),
    "PLAIN-MD5": ("md5", False, "HEX"),
    "LDAP-MD5": ("md5", False, "B64"),
    "SMD5": ("md5", True, "B64"),
}
_WEAK_DIGESTS = frozenset({"SHA", "SHA1", "SSHA", "PLAIN-MD5", "LDAP-MD5", "SMD5"})
_PLAIN = frozenset({"PLAIN", "CLEARTEXT"})
_CRYPT_NAMES = frozenset(
    {"CRYPT", "ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT"}
)
_ENCODINGS = {"B64": "B64", "BASE64": "B64", "HEX": "HEX"}

READABLE_SCHEMES = frozenset(_DIGESTS) | _PLAIN | _CRYPT_NAMES | {SCRAM_SCHEME}
WRITABLE_SCHEMES = READABLE_SCHEMES - _WEAK_DIGESTS - {"CRYPT"}

_SALT_LEN = 16
_BCRYPT_MAX = 72


def split_scheme(stored: str) -> tuple[str, str | None, str]:
    """Split ``{SCHEME.ENC}data`` into ``(SCHEME, ENC or None, data)``, upper-casing names.

    No prefix means ``CRYPT`` (Dovecot's passwd-file default).  Raises ``AuthError`` for an
    encoding suffix other than ``.B64``/``.BASE64``/``.HEX``.
    """
    if stored.startswith("{") and "}" in stored:
        end = stored.index("}")
        name, data = stored[1:end].upper(), stored[end + 1 :]
    else:
        return "CRYPT", None, stored
    scheme, dot, enc = name.rpartition(".")
    if not dot or scheme == "":
        return name, None, data
    if enc not in _ENCODINGS:
        # Not an encoding suffix we know; the whole thing is the (unknown) scheme name.
        return name, None, data
    return scheme, _ENCODINGS[enc], data


def _quote(name: str) -> str:
    return repr(name[:40])


# --- SHA-crypt (https://www.akkadia.org/drepper/SHA-crypt.txt) -------------------------------

_CRYPT64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ROUNDS_DEFAULT, _ROUNDS_MIN, _ROUNDS_MAX = 5000, 1000, 999_999_999
# Byte order of the final digest in the output, from the reference implementation: triples
# (B2, B1, B0) each become 4 characters, then the leftover byte(s).
_Order = tuple[tuple[int, int, int], ...]
_SHA256_ORDER: _Order = (
    (0, 10, 20),
    (21, 1, 11),
    (12, 22, 2),
    (3, 13, 23),
    (24, 4, 14),
    (15, 25, 5),
    (6, 16, 26),
    (27, 7, 17),
    (18, 28, 8),
    (9, 19, 29),
)
_SHA512_ORDER: _Order = (
    (0, 21, 42),
    (22, 43, 1),
    (44, 2, 23),
    (3, 24, 45),
    (25, 46, 4),
    (47, 5, 26),
    (6, 27, 48),
    (28, 49, 7),
    (50, 8, 29),
    (9, 30, 51),
    (31, 52, 10),
    (53, 11, 32),
    (12, 33, 54),
    (34, 55, 13),
    (56, 14, 35),
    (15, 36, 57),
    (37, 58, 16),
    (59, 17, 38),
    (18, 39, 60),
    (40, 61, 19),
    (62, 20, 41),
)


def _b64_from_24bit(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_CRYPT64[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeat(block: bytes, length: int) -> bytes:
    return (block * (length // len(block) + 1))[:length]


def sha_crypt(password: bytes, setting: str) -> str:
    """Drepper's SHA-crypt: ``setting`` is ``$5$`` or ``$6$``, optional ``rounds=N$``, salt.

    Anything after the salt's ``$`` (an existing hash) is ignored, so a stored value can be
    passed as its own setting.  Rounds are clamped to 1000..999999999 and the salt cut to 16
    characters, as the specification says.
    """
    if setting.startswith("$5$"):
        hash_fn, order, tail = hashlib.sha256, _SHA256_ORDER, 3
    elif setting.startswith("$6$"):
        hash_fn, order, tail = hashlib.sha512, _SHA512_ORDER, 2
    else:
        raise AuthError("not a SHA-crypt string (want $5$ or $6$)")
    rest = setting[3:]
    rounds, custom = _ROUNDS_DEFAULT, False
    if rest.startswith("rounds="):
        num, sep, rest = rest[7:].partition("$")
        if not sep or not num.isdigit() or not num.isascii():
            raise AuthError("malformed rounds= in SHA-crypt string")
        rounds, custom = min(max(int(num), _ROUNDS_MIN), _ROUNDS_MAX), True
    salt_text = rest.split("$", 1)[0][:16]
    salt = salt_text.encode("utf-8")
    pw = password

    db = hash_fn(pw + salt + pw).digest()
    a = hash_fn(pw + salt + _repeat(db, len(pw)))
    n = len(pw)
    while n:
        a.update(db if n & 1 else pw)
        n >>= 1
    da = a.digest()
    p_bytes = _repeat(hash_fn(pw * len(pw)).digest(), len(pw))
    s_bytes = _repeat(hash_fn(salt * (16 + da[0])).digest(), len(salt))
    c = da
    for i in range(rounds):
        ctx = hash_fn(p_bytes if i & 1 else c)
        if i % 3:
            ctx.update(s_bytes)
        if i % 7:
            ctx.update(p_bytes)
        ctx.update(c if i & 1 else p_bytes)
        c = ctx.digest()

    encoded = "".join(_b64_from_24bit(c[x], c[y], c[z], 4) for x, y, z in order)
    if tail == 3:
        encoded += _b64_from_24bit(0, c[31], c[30], 3)
    else:
        encoded += _b64_from_24bit(0, 0, c[63], 2)
    prefix = setting[:3] + (f"rounds={rounds}$" if custom else "")
    return f"{prefix}{salt_text}${encoded}"


def _new_sha_crypt_setting(prefix: str, rounds: int) -> str:
    salt = "".join(secrets.choice(_CRYPT64) for _ in range(16))
    return f"{prefix}rounds={rounds}${salt}" if rounds != _ROUNDS_DEFAULT else f"{prefix}{salt}"


# --- verification ------------------------------------------------------------------------------


def _same(a: bytes, b: bytes) -> bool:
    """Constant-time equality that does not even leak the lengths (both sides hashed first)."""
    return hmac.compare_digest(hashlib.sha256(a).digest(), hashlib.sha256(b).digest())


def _decode(data: str, enc: str, scheme: str) -> bytes:
    try:
        if enc == "HEX":
            return bytes.fromhex(data)
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthError(f"malformed {enc} data in {scheme} password hash") from exc


def _verify_digest(password: bytes, scheme: str, enc: str | None, data: str) -> bool:
    algo, salted, default_enc = _DIGESTS[scheme]
    size = hashlib.new(algo).digest_size
    if enc is None:
        enc = default_enc
        # Dovecot also accepts hex where base64 is the default, recognised by its length.
        if enc == "B64" and not salted and len(data) == 2 * size:
            enc = "HEX"
    raw = _decode(data.strip(), enc, scheme)
    if (salted and len(raw) <= size) or (not salted and len(raw) != size):
        raise AuthError(f"{scheme} password hash has the wrong length")
    digest, salt = raw[:size], raw[size:]
    return hmac.compare_digest(hashlib.new(algo, password + salt).digest(), digest)


def _verify_argon2(password: bytes, data: str, scheme: str) -> bool:
    if not data.startswith(("$argon2id$", "$argon2i$")):
        raise AuthError(f"{scheme} password hash is not an argon2i/argon2id string")
    try:
        params = argon2.extract_parameters(data)  # verify() calls a malformed hash a mismatch
        fast = sodium.verify(data, password, params)  # same answer, faster, when it applies
        if fast is not None:
            return fast
        return DEFAULT_ARGON2_PARAMS.hasher().verify(data, password)
    except InvalidHashError as exc:
        raise AuthError(f"malformed {scheme} password hash") from exc
    except VerificationError:  # includes VerifyMismatchError
        return False


def _verify_bcrypt(password: bytes, data: str) -> bool:
    if not data.startswith(("$2a$", "$2b$", "$2y$")):
        raise AuthError("BLF-CRYPT password hash is not a $2a$/$2b$/$2y$ string")
    # crypt(3) (and so Dovecot) reads only the first 72 bytes; bcrypt 5 refuses longer input.
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX], data.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise AuthError("malformed BLF-CRYPT password hash") from exc


def _verify_sha_crypt(password: bytes, data: str) -> bool:
    computed = sha_crypt(password, data)
    _, _, want = data.rpartition("$")
    _, _, got = computed.rpartition("$")
    if len(want) not in (43, 86):
        raise AuthError("malformed SHA-crypt password hash")
    return hmac.compare_digest(got.encode("ascii"), want.encode("utf-8", "surrogateescape"))


_CRYPT_IDS = (
    (("$argon2id$", "$argon2i$"), "ARGON2ID"),
    (("$2a$", "$2b$", "$2y$"), "BLF-CRYPT"),
    (("$6$",), "SHA512-CRYPT"),
    (("$5$",), "SHA256-CRYPT"),
)


def _verify_crypt(password: bytes, scheme: str, data: str) -> bool:
    if scheme == "CRYPT":
        for prefixes, name in _CRYPT_IDS:
            if data.startswith(prefixes):
                scheme = name
                break
        else:
            raise AuthError("CRYPT password hash of an unsupported kind (DES, $1$, yescrypt?)")
    if scheme in ("ARGON2ID", "ARGON2I"):
        return _verify_argon2(password, data, scheme)
    if scheme == "BLF-CRYPT":
        return _verify_bcrypt(password, data)
    want = "$6$" if scheme == "SHA512-CRYPT" else "$5$"
    if not data.startswith(want):
        raise AuthError(f"{scheme} password hash does not start with {want}")
    return _verify_sha_crypt(password, data)


def is_fast_scheme(stored: str) -> bool:
    """True when verifying against ``stored`` takes microseconds (PLAIN, a single digest).

    Callers run slow schemes (Argon2, bcrypt, SHA-crypt, SCRAM) in a worker
    thread; handing a microsecond check to a thread costs far more than the
    check itself (about 70 us of CPU per hand-off on a small VM).
    """
    try:
        scheme = split_scheme(stored)[0]
    except AuthError:
        return False
    return scheme in _PLAIN or scheme in _DIGESTS


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored`` (``{SCHEME}data``), compared in constant time.

    An empty hash never matches: an account without a password cannot log in.  Raises
    ``AuthError`` naming the scheme when ``stored`` is of an unknown scheme or malformed.
    Argon2 and bcrypt are slow on purpose: async callers run this in a worker thread.
    """
    scheme, enc, data = split_scheme(stored)
    if not data:
        return False
    pw = password.encode("utf-8", "surrogateescape")
    if scheme in _DIGESTS:
        return _verify_digest(pw, scheme, enc, data)
    if scheme in _PLAIN:
        secret = _decode(data, enc, scheme) if enc else data.encode("utf-8", "surrogateescape")
        return _same(pw, secret)
    if enc is not None:
        raise AuthError(f"password scheme {scheme} takes no encoding suffix")
    if scheme in _CRYPT_NAMES:
        return _verify_crypt(pw, scheme, data)
    if scheme == SCRAM_SCHEME:
        return ScramSecrets.from_field(data).check_password(password)
    raise AuthError(f"unknown password scheme {_quote(scheme)}")


@functools.cache
def _dummy_hash(params: Argon2Params) -> str:
    return params.hasher().hash(secrets.token_hex(16))


def verify_dummy(password: str, params: Argon2Params = DEFAULT_ARGON2_PARAMS) -> None:
    """Spend the time of one ARGON2ID verification, for a login whose user does not exist.

    Without this an unknown user fails at once and a known one after ~50 ms, which tells an
    attacker which names exist.  Pass the ``params`` your users' hashes use; the default hash is
    precomputed, others are made once and cached.
    """
    stored = _DUMMY_HASH if params == DEFAULT_ARGON2_PARAMS else _dummy_hash(params)
    with contextlib.suppress(VerificationError):
        params.hasher().verify(stored, password.encode("utf-8", "surrogateescape"))


# --- hashing -----------------------------------------------------------------------------------


def hash_password(
    password: str,
    scheme: str = DEFAULT_SCHEME,
    *,
    argon2_params: Argon2Params = DEFAULT_ARGON2_PARAMS,
    bcrypt_rounds: int = 12,
    sha_crypt_rounds: int = _ROUNDS_DEFAULT,
    scram_iterations: int = 4096,
) -> str:
    """Hash ``password`` as ``{SCHEME}data`` with a fresh random salt.

    ``scheme`` is any of :data:`WRITABLE_SCHEMES`, optionally with ``.B64``/``.HEX`` for the
    plain digest schemes and PLAIN.  Raises ``AuthError`` for an unknown or read-only scheme,
    and for a BLF-CRYPT password over 72 bytes (bcrypt would silently ignore the rest).
    """
    name, enc, _ = split_scheme("{" + scheme + "}")
    if name not in WRITABLE_SCHEMES:
        what = "read-only (too weak to write)" if name in READABLE_SCHEMES else "unknown"
        raise AuthError(f"password scheme {_quote(scheme)} is {what}")
    label = f"{{{name}.{enc}}}" if enc else f"{{{name}}}"
    if enc is not None and name not in _DIGESTS and name not in _PLAIN:
        raise AuthError(f"password scheme {name} takes no encoding suffix")
    pw = password.encode("utf-8")
    if name in _PLAIN:
        if enc is None:
            return label + password
        return label + (pw.hex() if enc == "HEX" else base64.b64encode(pw).decode("ascii"))
    if name in _DIGESTS:
        algo, salted, default_enc = _DIGESTS[name]
        salt = secrets.token_bytes(_SALT_LEN) if salted else b""
        raw = hashlib.new(algo, pw + salt).digest() + salt
        if (enc or default_enc) == "HEX":
            return label + raw.hex()
        return label + base64.b64encode(raw).decode("ascii")
    if name in ("ARGON2ID", "ARGON2I"):
        type_ = argon2.Type.ID if name == "ARGON2ID" else argon2.Type.I
        return label + argon2_params.hasher(type_).hash(pw)
    if name == "BLF-CRYPT":
        if len(pw) > _BCRYPT_MAX:
            raise AuthError("BLF-CRYPT cannot hash passwords over 72 bytes; use ARGON2ID")
        return label + bcrypt.hashpw(pw, bcrypt.gensalt(bcrypt_rounds)).decode("ascii")
    if name in ("SHA512-CRYPT", "SHA256-CRYPT"):
        prefix = "$6$" if name == "SHA512-CRYPT" else "$5$"
        return label + sha_crypt(pw, _new_sha_crypt_setting(prefix, sha_crypt_rounds))
    # SCRAM-SHA-256: to_field() carries its own {SCRAM-SHA-256} label.
    return make_scram_secrets(password, iterations=scram_iterations).to_field()


def needs_rehash(
    stored: str,
    scheme: str = DEFAULT_SCHEME,
    *,
    argon2_params: Argon2Params = DEFAULT_ARGON2_PARAMS,
) -> bool:
    """True when ``stored`` is not ``scheme`` (or not at ``argon2_params``): rehash at login.

    Crypt strings without a prefix count as the scheme their ``$id$`` names.
    """
    have, _, data = split_scheme(stored)
    if have == "CRYPT":
        have = next((n for p, n in _CRYPT_IDS if data.startswith(p)), "CRYPT")
        if have == "ARGON2ID" and data.startswith("$argon2i$"):
            have = "ARGON2I"
    want, _, _ = split_scheme("{" + scheme + "}")
    if have != want:
        return True
    if want in ("ARGON2ID", "ARGON2I"):
        type_ = argon2.Type.ID if want == "ARGON2ID" else argon2.Type.I
        try:
            return argon2_params.hasher(type_).check_needs_rehash(data)
        except (InvalidHashError, ValueError):
            return True
    return False

"""Server-side secrets for SCRAM-SHA-256 (RFC 5802, RFC 7677), and the pure helpers SASL needs.

The server never needs the password to run SCRAM: it stores ``StoredKey`` and ``ServerKey``
derived from it (RFC 5802 section 3), which is why SCRAM can be offered without keeping a
plaintext secret.  This module derives those keys, reads and writes them in Dovecot's
``{SCRAM-SHA-256}iterations,salt,StoredKey,ServerKey`` form (all base64), and offers the
primitive steps the sans-IO SASL code in ``mailbag.protocol`` calls.  The exchange itself
(message parsing, nonces on the wire, state) lives there, not here.

SASLprep (RFC 4013) is implemented with the standard library's ``stringprep`` tables, which are
Unicode 3.2 as RFC 3454 requires, so the same password prepares the same way on every Python.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

from mailbag.errors import AuthError

__all__ = [
    "DEFAULT_ITERATIONS",
    "MIN_ITERATIONS",
    "SCRAM_SCHEME",
    "SASLprepError",
    "ScramSecrets",
    "client_proof_matches",
    "decode_saslname",
    "encode_saslname",
    "make_scram_secrets",
    "new_nonce",
    "salted_password",
    "saslprep",
    "server_signature",
]

SCRAM_SCHEME = "SCRAM-SHA-256"
#: RFC 7677 section 4: the iteration count SHOULD be at least 4096.
MIN_ITERATIONS = 4096
DEFAULT_ITERATIONS = 4096
_KEY_LEN = hashlib.sha256().digest_size
_DEFAULT_SALT_LEN = 16


class SASLprepError(AuthError, ValueError):
    """A string SASLprep (RFC 4013) refuses: a prohibited character or bad bidi text.

    It is an ``AuthError`` so the CLI reports it like other auth problems, and a ``ValueError``
    because it is really bad input: SASL code should treat it as a failed authentication.
    """


def saslprep(s: str, *, allow_unassigned: bool = False) -> str:
    """Prepare ``s`` with the SASLprep profile of stringprep (RFC 4013, RFC 3454).

    ``allow_unassigned`` is False for *stored* strings (passwords we hash), as RFC 3454
    section 7 requires; a *query* string from a client may set it.  Raises ``SASLprepError``.
    """
    # RFC 4013 2.1: non-ASCII space (C.1.2) maps to SPACE, "commonly mapped to nothing" (B.1)
    # is removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in s if not stringprep.in_table_b1(c)
    )
    # RFC 4013 2.2: Unicode normalization form KC, with the Unicode 3.2 tables of RFC 3454.
    out = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not out:
        return out
    for c in out:
        # RFC 4013 2.3 prohibited output, and 2.5 unassigned code points.
        if (
            stringprep.in_table_c12(c)
            or stringprep.in_table_c21_c22(c)
            or stringprep.in_table_c3(c)
            or stringprep.in_table_c4(c)
            or stringprep.in_table_c5(c)
            or stringprep.in_table_c6(c)
            or stringprep.in_table_c7(c)
            or stringprep.in_table_c8(c)
            or stringprep.in_table_c9(c)
        ):
            raise SASLprepError(f"SASLprep: prohibited character U+{ord(c):04X}")
        if not allow_unassigned and stringprep.in_table_a1(c):
            raise SASLprepError(f"SASLprep: unassigned code point U+{ord(c):04X}")
    # RFC 4013 2.4 -> RFC 3454 section 6: bidirectional text rules.
    if any(stringprep.in_table_d1(c) for c in out):
        if any(stringprep.in_table_d2(c) for c in out):
            raise SASLprepError("SASLprep: mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise SASLprepError("SASLprep: right-to-left text must start and end with RandALCat")
    return out


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """``SaltedPassword := Hi(Normalize(password), salt, i)`` of RFC 5802 section 3.

    ``Hi`` is PBKDF2 with HMAC-SHA-256 and one output block, which is what ``hashlib`` computes.
    The password is SASLprep'd as a stored string.
    """
    prepared = saslprep(password).encode("utf-8")
    return hashlib.pbkdf2_hmac("sha256", prepared, salt, iterations, _KEY_LEN)


@dataclass(frozen=True)
class ScramSecrets:
    """What a SCRAM-SHA-256 server keeps per user (RFC 5802 section 3).

    ``stored_key`` lets the server check a client proof and ``server_key`` lets it prove itself
    to the client; either one lets an attacker impersonate someone, so both stay out of ``repr``.
    """

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise AuthError(f"SCRAM iteration count must be positive, not {self.iterations}")
        if not self.salt:
            raise AuthError("SCRAM salt must not be empty")
        if len(self.stored_key) != _KEY_LEN or len(self.server_key) != _KEY_LEN:
            raise AuthError(f"SCRAM-SHA-256 keys must be {_KEY_LEN} bytes")

    def __repr__(self) -> str:
        return (
            f"ScramSecrets(iterations={self.iterations}, salt=<{len(self.salt)} bytes>, "
            "stored_key=<hidden>, server_key=<hidden>)"
        )

    def to_field(self) -> str:
        """Dovecot's form: ``{SCRAM-SHA-256}iterations,salt,StoredKey,ServerKey`` (base64)."""
        parts = [base64.b64encode(b).decode("ascii") for b in self._byte_fields()]
        return f"{{{SCRAM_SCHEME}}}{self.iterations}," + ",".join(parts)

    def _byte_fields(self) -> tuple[bytes, bytes, bytes]:
        return (self.salt, self.stored_key, self.server_key)

    @classmethod
    def from_field(cls, field: str) -> ScramSecrets:
        """Parse :meth:`to_field` output; the ``{SCRAM-SHA-256}`` prefix is optional.

        Raises ``AuthError`` (never a traceback for the client) when the text is malformed.
        """
        text = field.strip()
        if text.startswith("{"):
            end = text.find("}")
            scheme = text[1:end].upper() if end > 0 else ""
            if scheme != SCRAM_SCHEME:
                raise AuthError(f"not a {SCRAM_SCHEME} field: scheme {scheme[:40]!r}")
            text = text[end + 1 :]
        parts = text.split(",")
        if len(parts) != 4 or not parts[0].isdigit():
            raise AuthError(f"malformed {SCRAM_SCHEME} field (want iterations,salt,stored,server)")
        try:
            salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[1:])
        except (binascii.Error, ValueError) as exc:
            raise AuthError(f"malformed {SCRAM_SCHEME} field: bad base64") from exc
        return cls(int(parts[0]), salt, stored, server)

    def check_password(self, password: str) -> bool:
        """True when ``password`` derives these keys; lets USER/PASS work for SCRAM-only users."""
        try:
            salted = salted_password(password, self.salt, self.iterations)
        except SASLprepError:
            return False
        stored = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
        return hmac.compare_digest(stored, self.stored_key)


def make_scram_secrets(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> ScramSecrets:
    """Derive the server's SCRAM-SHA-256 secrets for ``password`` (RFC 5802 section 3).

    ``ClientKey = HMAC(SaltedPassword, "Client Key")``, ``StoredKey = H(ClientKey)``,
    ``ServerKey = HMAC(SaltedPassword, "Server Key")``.  Raises ``SASLprepError`` for a
    password SASLprep prohibits, and ``ValueError`` for fewer than :data:`MIN_ITERATIONS`.
    """
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"SCRAM iteration count must be at least {MIN_ITERATIONS} (RFC 7677)")
    if salt is None:
        salt = secrets.token_bytes(_DEFAULT_SALT_LEN)
    salted = salted_password(password, salt, iterations)
    stored_key = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    server_key = _hmac(salted, b"Server Key")
    return ScramSecrets(iterations, salt, stored_key, server_key)


def client_proof_matches(secrets_: ScramSecrets, auth_message: bytes, client_proof: bytes) -> bool:
    """Check a client-final ``p=`` proof (RFC 5802 section 3), in constant time.

    ``ClientSignature = HMAC(StoredKey, AuthMessage)``; ``ClientKey = ClientProof XOR
    ClientSignature``; the proof is good when ``H(ClientKey) == StoredKey``.
    """
    if len(client_proof) != _KEY_LEN:
        return False
    signature = _hmac(secrets_.stored_key, auth_message)
    client_key = bytes(a ^ b for a, b in zip(client_proof, signature, strict=True))
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), secrets_.stored_key)


def server_signature(secrets_: ScramSecrets, auth_message: bytes) -> bytes:
    """``ServerSignature = HMAC(ServerKey, AuthMessage)``, sent base64'd as ``v=`` (5802 s3)."""
    return _hmac(secrets_.server_key, auth_message)


def new_nonce(nbytes: int = 18) -> str:
    """A fresh server nonce part: printable, no ``,`` (RFC 5802 section 5.1 ``r=``)."""
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def encode_saslname(name: str) -> str:
    """Escape ``=`` and ``,`` as ``=3D`` and ``=2C`` (RFC 5802 section 5.1 ``saslname``)."""
    return name.replace("=", "=3D").replace(",", "=2C")


def decode_saslname(value: str) -> str:
    """Undo :func:`encode_saslname`; any other ``=`` sequence is an error (``SASLprepError``)."""
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == ",":
            raise SASLprepError("saslname contains an unescaped ','")
        if c == "=":
            esc = value[i : i + 3]
            if esc == "=2C":
                out.append(",")
            elif esc == "=3D":
                out.append("=")
            else:
                raise SASLprepError("saslname contains a bad '=' escape")
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)

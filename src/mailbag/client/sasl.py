"""Which login to use, and the client side of SCRAM-SHA-256 and APOP, without I/O.

A POP3 server can offer four ways in: SASL SCRAM-SHA-256 (RFC 5802, RFC
7677; the password never crosses the wire and the *server* proves it knows
the password too), SASL PLAIN (RFC 4616), APOP (RFC 1939 section 7, an MD5
challenge-response) and USER/PASS.  ``choose`` picks the best one the server
announces -- SCRAM, then PLAIN, then USER/PASS, then APOP (APOP needs a
separate shared secret on many servers, mailbag included, and MD5 is weak)
-- or honours ``--auth``.  When nothing usable is offered the error says
why, typically "plaintext logins are only allowed over TLS".

The SCRAM math reuses ``mailbag.auth.scram`` (SASLprep, ``Hi()``, saslname
escaping): the same code the server uses, tested against RFC 7677's vector
and against ``scramp``.  Everything here is pure: tested with byte strings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, Sequence

from mailbag.auth.scram import (
    MIN_ITERATIONS,
    SASLprepError,
    encode_saslname,
    salted_password,
    saslprep,
)
from mailbag.errors import MailbagError

#: ``--auth`` values, in the order ``auto`` prefers them.
MECHANISMS = ("scram-sha-256", "plain", "user", "apop")
#: Logins that show the server (and, without TLS, the network) the password itself.
PLAINTEXT = frozenset({"plain", "user"})
#: Names as the protocol spells them (SASL names, or the POP3 commands).
WIRE_NAMES = {"scram-sha-256": "SASL SCRAM-SHA-256", "plain": "SASL PLAIN",
              "user": "USER/PASS", "apop": "APOP"}
#: A server asking for more PBKDF2 rounds than this is trying to burn our CPU.
MAX_ITERATIONS = 10_000_000
_TIMESTAMP = re.compile(r"<[^<>\s]+@[^<>\s]+>")


class LoginError(MailbagError):
    """No usable login, or a server that failed to prove itself (SCRAM)."""


def apop_timestamp(greeting: str) -> str | None:
    """The ``<...@...>`` challenge of an APOP-capable greeting (RFC 1939 section 7)."""
    match = _TIMESTAMP.search(greeting)
    return match.group(0) if match else None


def apop_digest(timestamp: str, secret: str) -> str:
    """``MD5(timestamp + secret)`` in lower-case hex, as RFC 1939 section 7 defines it."""
    return hashlib.md5((timestamp + secret).encode("utf-8"), usedforsecurity=False).hexdigest()


def offered(capabilities: Mapping[str, Sequence[str]] | None, greeting: str) -> list[str]:
    """The logins the server announces, in our preference order.

    A server without CAPA (RFC 1939 only) is assumed to take USER/PASS.
    """
    sasl = {m.upper() for m in (capabilities or {}).get("SASL", [])}
    found = {
        "scram-sha-256": "SCRAM-SHA-256" in sasl,
        "plain": "PLAIN" in sasl,
        "user": capabilities is None or "USER" in capabilities,
        "apop": apop_timestamp(greeting) is not None,
    }
    return [m for m in MECHANISMS if found[m]]


def choose(forced: str, capabilities: Mapping[str, Sequence[str]] | None, greeting: str,
           *, host: str, tls: bool) -> str:
    """The login to use: ``forced`` unless it is "auto", else the best offered one."""
    available = offered(capabilities, greeting)
    if forced != "auto":
        if forced not in MECHANISMS:
            raise LoginError(f"unknown login method {forced!r} "
                             f"(use one of: auto, {', '.join(MECHANISMS)})")
        if forced == "apop" and "apop" not in available:
            raise LoginError(f"{host} does not offer APOP (its greeting has no <timestamp>)")
        return forced  # tried even if not announced: some servers do not list USER
    if available:
        return available[0]
    sasl = " ".join((capabilities or {}).get("SASL", [])) or "none"
    hint = ("; it allows plaintext logins (USER, PLAIN) only over TLS: use pop3s:// or ask "
            "for STLS" if not tls else "")
    raise LoginError(f"{host} offers no login method mailbag can use{hint} "
                     f"(SASL mechanisms offered: {sasl}; mailbag speaks "
                     f"{', '.join(WIRE_NAMES[m] for m in MECHANISMS)})")


def plain_response(user: str, password: str) -> bytes:
    """The RFC 4616 PLAIN message: empty authzid, user, password."""
    return f"\0{user}\0{password}".encode()


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _attributes(message: bytes) -> dict[str, str]:
    """``a=1,b=2`` -> {"a": "1", "b": "2"} (RFC 5802 section 5; values may hold '=')."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoginError("SCRAM: server message is not UTF-8") from exc
    out: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if eq and len(key) == 1 and key not in out:
            out[key] = value
    return out


class ScramClient:
    """One SCRAM-SHA-256 exchange (RFC 5802 section 3, RFC 7677), client side.

    No channel binding (gs2 header ``n,,``).  ``first()`` is the initial
    response, ``final(server_first)`` the proof, and ``verify(server_final)``
    checks the server's signature: a server that cannot produce it does not
    know the password, and the session must not be used.
    """

    def __init__(self, user: str, password: str, nonce: str | None = None) -> None:
        try:
            name = encode_saslname(saslprep(user, allow_unassigned=True))
        except SASLprepError as exc:
            raise LoginError(f"SCRAM: the user name cannot be prepared: {exc}") from exc
        self._password = password
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._bare = f"n={name},r={self._nonce}"
        self._server_signature: bytes | None = None

    def __repr__(self) -> str:
        return "ScramClient(<secret>)"

    def first(self) -> bytes:
        """client-first-message: gs2 header plus ``n=user,r=nonce``."""
        return f"n,,{self._bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        """client-final-message with the proof, from the server's salt and iteration count."""
        attrs = _attributes(server_first)
        if "e" in attrs:
            raise LoginError(f"SCRAM: server error {attrs['e'][:80]!r}")
        nonce, salt_b64, count = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise LoginError("SCRAM: the server's nonce does not extend ours")
        if not count.isdigit() or not MIN_ITERATIONS <= int(count) <= MAX_ITERATIONS:
            raise LoginError(f"SCRAM: unacceptable iteration count {count[:20]!r} "
                             f"(RFC 7677 asks for at least {MIN_ITERATIONS})")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LoginError("SCRAM: bad salt from the server") from exc
        if not salt:
            raise LoginError("SCRAM: empty salt from the server")
        try:
            salted = salted_password(self._password, salt, int(count))
        except SASLprepError as exc:
            raise LoginError(f"SCRAM: the password cannot be prepared: {exc}") from exc
        without_proof = f"c=biws,r={nonce}"  # biws = base64("n,,")
        auth_message = ",".join((self._bare, server_first.decode("utf-8"), without_proof))
        client_key = _hmac(salted, b"Client Key")
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message.encode())
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message.encode())
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check ``v=ServerSignature`` (constant time); raise LoginError if it is wrong."""
        attrs = _attributes(server_final)
        if "e" in attrs:
            raise LoginError(f"SCRAM: server error {attrs['e'][:80]!r}")
        if self._server_signature is None:
            raise LoginError("SCRAM: server-final before client-final")
        try:
            claimed = base64.b64decode(attrs.get("v", ""), validate=True)
        except (binascii.Error, ValueError):
            claimed = b""
        if not hmac.compare_digest(claimed, self._server_signature):
            raise LoginError("SCRAM: the server's signature is wrong -- it does not know "
                             "your password (impostor or misconfigured server)")

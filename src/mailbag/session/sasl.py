"""Driver-side SASL mechanisms for POP3 AUTH (RFC 5034): SCRAM-SHA-256 (RFC 5802, RFC 7677).

The state machine in ``protocol.pop3`` frames the exchange (``+ base64`` challenges, ``*``
cancellation, line lengths) and handles PLAIN itself, because PLAIN is just a password check.
SCRAM needs the user's stored keys in the middle of the exchange, so it lives here, next to
the authenticator, as a sans-IO object: ``start(initial)`` and ``step(data)`` take the decoded
client response and return what to do next (``Challenge``, ``Success`` or ``Failure``).  No
sockets, no event loop, no clock: every rule is testable with byte strings.

RFC 5034 section 4 has no "additional data with success", so the SCRAM server-final message
(``v=ServerSignature``) goes out as one more challenge; the client answers with an empty line,
and only then does the server say ``+OK``.  ``Success.final`` carries that server-final message
so the driver can apply its throttle *before* revealing the verdict.

Unknown users and users without SCRAM keys get a made-up but stable salt (derived from a
per-process key and the user name), so the server-first message does not reveal which
accounts exist; the exchange then fails at the proof, exactly like a wrong password.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mailbag.auth.scram import (
    DEFAULT_ITERATIONS,
    SASLprepError,
    ScramSecrets,
    client_proof_matches,
    decode_saslname,
    new_nonce,
    server_signature,
)

SCRAM_SHA_256 = "SCRAM-SHA-256"
#: Mechanisms this module implements (PLAIN is handled by the protocol core).
DRIVER_MECHANISMS = (SCRAM_SHA_256,)
#: Key for the decoy salts of unknown users: random per process, so they cannot be precomputed.
_DECOY_KEY = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` as a ``+ base64`` challenge and wait for the client's next line."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Success:
    """The client proved who it is.

    ``user`` is the canonical account name, ``login`` the name the client gave.  ``final``,
    when not None, must still be sent as a challenge; the client's (empty) answer to it then
    yields a ``Success`` with ``final=None``, which is the moment to log in.
    """

    user: str
    login: str
    final: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Failure:
    """Authentication failed; ``reason`` is for the log (never client secrets)."""

    reason: str
    login: str = ""


Step = Challenge | Success | Failure


class SaslMechanism(Protocol):
    """One SASL exchange, server side (a new object per AUTH command)."""

    name: str

    def start(self, initial: bytes | None) -> Step:
        """Begin; ``initial`` is the decoded initial response (None: the client sent none)."""
        ...

    def step(self, data: bytes) -> Step:
        """The decoded client response to the last challenge."""
        ...


#: Find an account for SCRAM: ``(canonical name, secrets or None)``, or None for no such user.
#: May raise ``AuthError`` when the users database cannot be read.
ScramLookup = Callable[[str], tuple[str, ScramSecrets | None] | None]


def new_mechanism(name: str, scram_lookup: ScramLookup) -> SaslMechanism | None:
    """The mechanism called ``name`` (upper case), or None if this module has none by that name."""
    if name == SCRAM_SHA_256:
        return ScramSha256Server(scram_lookup)
    return None


def decoy_secrets(login: str) -> ScramSecrets:
    """Stable, meaningless SCRAM secrets for a user that does not exist (or has no keys).

    The same name always gets the same salt within one server process, so asking twice cannot
    tell a real account from a missing one; no password matches the keys.
    """
    digest = hmac.new(_DECOY_KEY, login.encode("utf-8", "surrogatepass"), hashlib.sha512).digest()
    return ScramSecrets(DEFAULT_ITERATIONS, digest[:16], digest[16:48], digest[32:64])


class _Phase(enum.Enum):
    CLIENT_FIRST = enum.auto()
    CLIENT_FINAL = enum.auto()
    EMPTY_AFTER_SUCCESS = enum.auto()
    DONE = enum.auto()


class _Malformed(Exception):
    """A SCRAM message that does not follow RFC 5802 section 7; the text goes to the log."""


def _printable_nonce(value: str) -> bool:
    """RFC 5802 section 7: ``printable = %x21-2B / %x2D-7E`` (no comma)."""
    return bool(value) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in value)


def _is_attribute(value: str) -> bool:
    """RFC 5802 section 7: ``attr-val = ALPHA "=" value`` (optional extensions are ignored)."""
    return len(value) >= 2 and value[0].isascii() and value[0].isalpha() and value[1] == "="


class ScramSha256Server:
    """SCRAM-SHA-256 server side (RFC 5802 section 5, RFC 7677), without channel binding.

    Only ``SCRAM-SHA-256`` is offered, not ``-PLUS``: a client that asks for channel binding
    (``p=``) is refused, and one that says ``y`` (it could bind but thinks we cannot) is
    accepted, as RFC 5802 section 6 allows when the server does not support binding.
    """

    name = SCRAM_SHA_256

    def __init__(self, lookup: ScramLookup) -> None:
        self._lookup = lookup
        self._phase = _Phase.CLIENT_FIRST
        self._login = ""
        self._user: str | None = None
        self._secrets: ScramSecrets | None = None
        self._why_not = ""
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def __repr__(self) -> str:
        return f"ScramSha256Server(phase={self._phase.name}, login={self._login!r})"

    def start(self, initial: bytes | None) -> Step:
        """SCRAM is client-first: with no initial response, ask for one with an empty challenge."""
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    def step(self, data: bytes) -> Step:
        """Advance the exchange by one client message."""
        try:
            if self._phase is _Phase.CLIENT_FIRST:
                return self._client_first(data)
            if self._phase is _Phase.CLIENT_FINAL:
                return self._client_final(data)
            if self._phase is _Phase.EMPTY_AFTER_SUCCESS:
                return self._after_success(data)
        except _Malformed as exc:
            return self._fail(str(exc))
        return self._fail("exchange already finished")

    def _fail(self, reason: str) -> Failure:
        self._phase = _Phase.DONE
        return Failure(reason, self._login)

    @staticmethod
    def _text(data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("SCRAM message is not UTF-8") from None

    def _client_first(self, data: bytes) -> Step:
        # client-first-message = gs2-header client-first-message-bare
        # gs2-header = gs2-cbind-flag "," [ authzid ] ","
        text = self._text(data)
        flag, sep1, rest = text.partition(",")
        authzid_part, sep2, bare = rest.partition(",")
        if not (sep1 and sep2):
            raise _Malformed("malformed client-first message")
        if flag.startswith("p="):
            raise _Malformed("channel binding requested but not offered")
        if flag not in ("n", "y"):
            raise _Malformed("malformed gs2 channel-binding flag")
        self._gs2_header = f"{flag},{authzid_part},"
        authzid = ""
        try:
            if authzid_part:
                if not authzid_part.startswith("a="):
                    raise _Malformed("malformed authzid")
                authzid = decode_saslname(authzid_part[2:])
            if bare.startswith("m="):
                raise _Malformed("unsupported mandatory extension")
            attrs = bare.split(",")
            if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
                raise _Malformed("malformed client-first message")
            login = decode_saslname(attrs[0][2:])
        except SASLprepError:
            raise _Malformed("malformed saslname") from None
        client_nonce = attrs[1][2:]
        if not login or not _printable_nonce(client_nonce):
            raise _Malformed("malformed client-first message")
        if not all(_is_attribute(a) for a in attrs[2:]):
            raise _Malformed("malformed extension attribute")
        self._login = login
        self._client_first_bare = bare
        found = self._lookup(login)  # AuthError (database unreadable) goes to the driver
        if found is None:
            self._why_not = "unknown user"
        elif found[1] is None:
            self._why_not = "no SCRAM secret stored"
        else:
            self._user, self._secrets = found
        if authzid and self._user is not None and authzid not in (login, self._user):
            # RFC 5802 section 5.1: we act only as the authenticated user; no proxying.
            self._why_not = "authorization identity not allowed"
            self._user = self._secrets = None
        used = self._secrets or decoy_secrets(login)
        self._nonce = client_nonce + new_nonce()
        salt = base64.b64encode(used.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={used.iterations}"
        self._phase = _Phase.CLIENT_FINAL
        return Challenge(self._server_first.encode("ascii"))

    def _client_final(self, data: bytes) -> Step:
        # client-final-message = channel-binding "," nonce ["," extensions] "," proof
        text = self._text(data)
        without_proof, sep, proof_attr = text.rpartition(",")
        if not sep or not proof_attr.startswith("p="):
            raise _Malformed("malformed client-final message")
        attrs = without_proof.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("c=") or not attrs[1].startswith("r="):
            raise _Malformed("malformed client-final message")
        expected_binding = base64.b64encode(self._gs2_header.encode("utf-8")).decode("ascii")
        if attrs[0][2:] != expected_binding:
            raise _Malformed("channel binding data does not match")
        if not hmac.compare_digest(attrs[1][2:].encode(), self._nonce.encode()):
            raise _Malformed("nonce does not match")
        try:
            proof = base64.b64decode(proof_attr[2:], validate=True)
        except (binascii.Error, ValueError):
            raise _Malformed("malformed client proof") from None
        auth_message = ",".join(
            (self._client_first_bare, self._server_first, without_proof)
        ).encode("utf-8")
        used = self._secrets or decoy_secrets(self._login)
        good = client_proof_matches(used, auth_message, proof)  # constant time, always computed
        if self._user is None or self._secrets is None:
            return self._fail(self._why_not)
        if not good:
            return self._fail("wrong password")
        signature = base64.b64encode(server_signature(self._secrets, auth_message))
        self._phase = _Phase.EMPTY_AFTER_SUCCESS
        return Success(self._user, self._login, final=b"v=" + signature)

    def _after_success(self, data: bytes) -> Step:
        if data:
            raise _Malformed("unexpected data after server-final message")
        self._phase = _Phase.DONE
        assert self._user is not None
        return Success(self._user, self._login)

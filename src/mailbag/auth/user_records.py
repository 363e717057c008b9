"""The users file's line format: one account per line, and the record it stands for.

Parsing and building lines lives here, apart from the file handling
(``users``: reading and caching; ``users_admin``: locked, atomic rewrites),
so both sides use one definition of the format.  The format itself is
described in ``users``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mailbag.auth.schemes import (
    Argon2Params,
    hash_password,
    split_scheme,
    verify_dummy,
    verify_password,
)
from mailbag.auth.scram import SCRAM_SCHEME, ScramSecrets, make_scram_secrets
from mailbag.errors import AuthError, InvalidUsername, MailbagError

MAX_USERNAME_OCTETS = 255
_EXTRA_INDEX = 7  # name, password, uid, gid, gecos, home, shell, extra_fields
_KNOWN_EXTRAS = ("scram", "apop", "quota_bytes", "quota_messages")


class UserExists(MailbagError):
    """``UsersFile.add`` of a name that is already there."""


def validate_username(name: str) -> str:
    """Return ``name`` NFC-normalized if it is safe as a login and as a path component.

    Refused (``InvalidUsername``): empty or over 255 UTF-8 octets (a file name limit); ``/``,
    ``\\``, ``:`` (the field separator), any control, format, surrogate, private-use or
    unassigned character (Unicode category C*) and any whitespace or separator (Z*, plus
    ASCII whitespace); ``.`` and ``..``; a leading ``.`` or ``-`` (hidden files, options) or
    ``#`` (a comment line in the file);
    an empty local part or domain around the last ``@``.  UTF-8 letters are allowed.
    """
    name = unicodedata.normalize("NFC", name)
    if not name:
        raise InvalidUsername("empty user name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_USERNAME_OCTETS:
        raise InvalidUsername(f"user name longer than {MAX_USERNAME_OCTETS} octets")
    for ch in name:
        if ch in "/\\:" or ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            raise InvalidUsername(f"user name contains a forbidden character U+{ord(ch):04X}")
    if name in (".", "..") or name[0] in ".-#":
        raise InvalidUsername("user name must not be '.', '..' or start with '.', '-' or '#'")
    if "@" in name:
        local, _, domain = name.rpartition("@")
        if not local or not domain:
            raise InvalidUsername("user name has an empty local part or domain")
    return name


def _key(name: str) -> str:
    """Index key: the domain after the last ``@`` is case-insensitive, the local part is not."""
    local, at, domain = name.rpartition("@")
    return f"{local}@{domain.lower()}" if at else name


@dataclass(frozen=True, repr=False)
class UserRecord:
    """One account as the server needs it; ``name`` is canonical (use it for the maildrop)."""

    name: str
    password: str
    scram: ScramSecrets | None = None
    apop_secret: str | None = None
    quota_bytes: int | None = None
    quota_messages: int | None = None

    def __repr__(self) -> str:
        scheme = split_scheme(self.password)[0] if self.password else None
        return (
            f"UserRecord(name={self.name!r}, password=<{scheme} hidden>, "
            f"scram={'<set>' if self.scram else None}, "
            f"apop_secret={'<hidden>' if self.apop_secret is not None else None}, "
            f"quota_bytes={self.quota_bytes}, quota_messages={self.quota_messages})"
        )


@runtime_checkable
class UserDatabase(Protocol):
    """What the session needs from any user store (file now, a database later)."""

    def lookup(self, login: str) -> UserRecord | None:
        """The record ``login`` names, or None; never raises for a malformed login."""
        ...


def authenticate(db: UserDatabase, login: str, password: str) -> UserRecord | None:
    """Look ``login`` up and check ``password``; an unknown user costs a dummy verification.

    This is the one place that gets the timing right, so callers should not open-code it.  It
    is CPU-bound (Argon2): run it in a worker thread from asyncio.  ``AuthError`` (bad stored
    hash, unreadable users file) propagates for the logs; answer the client ``-ERR [AUTH]``.
    """
    record = db.lookup(login)
    if record is None:
        verify_dummy(password)
        return None
    return record if verify_password(password, record.password) else None


def _parse_count(key: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"{key} must be a non-negative integer")
    return int(value)


def _parse_line(text: str) -> UserRecord | None:
    """Parse one line; None for blank/comment lines, ``ValueError`` (a reason) for bad ones."""
    if not text.strip() or text.lstrip().startswith("#"):
        return None
    fields = text.split(":", _EXTRA_INDEX)
    if len(fields) < 2:
        raise ValueError("no password field")
    try:
        name = validate_username(fields[0])
    except InvalidUsername as exc:
        raise ValueError(f"invalid user name ({exc})") from None
    password = fields[1]
    values: dict[str, str] = {}
    if len(fields) > _EXTRA_INDEX:
        for token in fields[_EXTRA_INDEX].split():
            key, _, value = token.partition("=")
            if key in _KNOWN_EXTRAS:
                values[key] = value
    scram: ScramSecrets | None = None
    try:
        if "scram" in values:
            scram = ScramSecrets.from_field(values["scram"])
        elif split_scheme(password)[0] == SCRAM_SCHEME:
            scram = ScramSecrets.from_field(password)
    except AuthError as exc:
        raise ValueError(str(exc)) from None
    quotas = {
        k: _parse_count(k, values[k]) for k in ("quota_bytes", "quota_messages") if k in values
    }
    apop = values.get("apop")
    return UserRecord(
        name, password, scram, apop or None, quotas.get("quota_bytes"), quotas.get("quota_messages")
    )


def _set_extras(line: str, updates: dict[str, str | None]) -> str:
    """Rewrite ``line`` with extra fields set (or removed, for None), others kept in order."""
    fields = line.split(":", _EXTRA_INDEX)
    fields += [""] * (_EXTRA_INDEX + 1 - len(fields))
    tokens = [t for t in fields[_EXTRA_INDEX].split() if t.partition("=")[0] not in updates]
    tokens += [f"{k}={v}" for k, v in updates.items() if v is not None]
    fields[_EXTRA_INDEX] = " ".join(tokens)
    while len(fields) > 2 and fields[-1] == "":
        fields.pop()
    return ":".join(fields)


def check_storable(what: str, value: str, *, allow_colon: bool) -> None:
    """Refuse a value that could not be written on one users-file line."""
    bad = [c for c in value if c.isspace() or unicodedata.category(c)[0] == "C"]
    if bad or (not allow_colon and ":" in value):
        raise AuthError(
            f"{what} cannot be stored in the users file (whitespace, ':' or a "
            "control character; for PLAIN use PLAIN.B64)"
        )


def make_secrets(
    password: str,
    scheme: str,
    *,
    with_scram: bool,
    apop_secret: str | None,
    argon2_params: Argon2Params,
    scram_iterations: int,
) -> tuple[str, str | None, str | None]:
    """What any user store keeps for a password: (hash, SCRAM field or None, APOP or None).

    Checks the APOP secret first.  The SCRAM field is None when not wanted or when the
    password field is SCRAM itself.  Values are checked to fit a users-file line, so an
    account can always move between the file and the database.
    """
    if apop_secret is not None:
        check_storable("the APOP secret", apop_secret, allow_colon=True)
    stored = hash_password(
        password, scheme, argon2_params=argon2_params, scram_iterations=scram_iterations
    )
    check_storable("the password hash", stored, allow_colon=False)
    scram = None
    if with_scram and split_scheme(stored)[0] != SCRAM_SCHEME:
        scram = make_scram_secrets(password, iterations=scram_iterations).to_field()
    return stored, scram, apop_secret or None


def user_key(name: str) -> str:
    """The lookup key of a name: the domain after the last ``@`` is case-insensitive."""
    return _key(name)


def login_candidates(login: str, default_domain: str | None) -> list[str]:
    """Names ``login`` may mean, in order: itself, then via ``default_domain``."""
    candidates = [login]
    if default_domain:
        local, at, domain = login.rpartition("@")
        if not at:
            candidates.append(f"{login}@{default_domain}")
        elif domain.lower() == default_domain.lower():
            candidates.append(local)
    return candidates


async def lookup_user(db: UserDatabase, login: str) -> UserRecord | None:
    """Look ``login`` up without blocking the event loop.

    A database-backed store offers ``lookup_async`` (a query); the users file
    answers from memory through ``lookup``.  Callers in async code use this.
    """
    lookup_async = getattr(db, "lookup_async", None)
    if lookup_async is not None:
        found: UserRecord | None = await lookup_async(login)
        return found
    return db.lookup(login)

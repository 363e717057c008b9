"""The users file: Dovecot passwd-file lines, lookups for logins, and safe rewrites for admins.

Format, one user per line (Dovecot ``passwd-file`` compatible, so either side can read it)::

    name:{SCHEME}hash[:uid:gid:gecos:home:shell:extra_fields]

``extra_fields`` (everything after the seventh ``:``) is a space-separated list of ``key=value``.
mailbag reads ``scram={SCRAM-SHA-256}i,salt,StoredKey,ServerKey``, ``apop=<secret>``,
``quota_bytes=N`` and ``quota_messages=N``, and keeps every other field untouched.  Blank lines,
``#`` comments and lines it does not understand survive every rewrite byte for byte.  A line that
cannot be parsed is skipped with a warning naming its line number (never its text, which may
hold a password), so one typo does not lock everybody out.

APOP trade-off: APOP (RFC 1939 section 7) proves knowledge of a *shared secret* with an MD5
digest, so the server must keep that secret in retrievable form.  ``apop=`` therefore stores it
in plaintext, is opt-in per user, and should differ from the login password: whoever reads this
file can use it.  Prefer TLS with USER/PASS or SCRAM.

User names (see :func:`validate_username`) keep their case; only the domain part after the last
``@`` compares case-insensitively, because RFC 5321 lets the local part be case-sensitive and
the name may become a Maildir directory.  Names are NFC-normalized so that the same visible
UTF-8 login (RFC 6856) always maps to the same account.
"""

from __future__ import annotations

import builtins
import fcntl
import logging
import os
import stat
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from mailbag.auth.schemes import (
    DEFAULT_ARGON2_PARAMS,
    Argon2Params,
    hash_password,
    split_scheme,
    verify_dummy,
    verify_password,
)
from mailbag.auth.scram import SCRAM_SCHEME, ScramSecrets, make_scram_secrets
from mailbag.errors import AuthError, InvalidUsername, MailbagError, UnknownUser

__all__ = [
    "UserDatabase",
    "UserExists",
    "UserRecord",
    "UsersFile",
    "authenticate",
    "login_candidates",
    "lookup_user",
    "make_secrets",
    "user_key",
    "validate_username",
]

log = logging.getLogger(__name__)

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


def login_candidates(login: str, default_domain: str | None) -> builtins.list[str]:
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


class UsersFile:
    """A Dovecot-compatible users file, re-read whenever it changes on disk.

    Every ``lookup`` does one ``stat`` (cheap, and no window in which a changed password still
    works) and reloads when ``(st_dev, st_ino, st_mtime_ns, st_size)`` changed.  Rewrites
    replace the file, so the inode changes even within one mtime tick.

    Admin operations serialise on an ``fcntl.flock`` of the sibling ``<name>.lock`` and replace
    the file atomically (temp file, fsync, ``os.replace``, fsync of the directory), so a crash
    leaves the old or the new file, never half of one.  Editors that ignore the lock can still
    race with them, as with Dovecot.  The file ends up mode 0600, or 0640 if it was group
    readable; owner and group are kept where permissions allow.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        default_domain: str | None = None,
        argon2_params: Argon2Params = DEFAULT_ARGON2_PARAMS,
        scram_iterations: int = 4096,
    ) -> None:
        self.path = Path(path)
        self.default_domain = default_domain
        self.argon2_params = argon2_params
        self.scram_iterations = scram_iterations
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._records: builtins.list[UserRecord] = []
        self._index: dict[str, UserRecord] = {}
        self._loaded = False
        self.problems: tuple[str, ...] = ()
        """Warnings from the last load: ``"<path>:<line>: <reason>"``, no line contents."""

    def __repr__(self) -> str:
        return f"UsersFile({str(self.path)!r}, default_domain={self.default_domain!r})"

    # --- reading ---------------------------------------------------------------------------

    def _stat(self) -> os.stat_result | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuthError(f"users file {self.path}: cannot stat: {exc.strerror}") from exc
        if stat.S_ISDIR(st.st_mode):
            raise AuthError(f"users file {self.path} is a directory")
        return st

    @staticmethod
    def _sig(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_lines(self) -> tuple[builtins.list[str], os.stat_result | None]:
        """The file's lines (no newlines, undecodable bytes kept via surrogateescape)."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISDIR(st.st_mode):
                    raise AuthError(f"users file {self.path} is a directory")
                data = f.read()
        except FileNotFoundError:
            return [], None
        except IsADirectoryError as exc:
            raise AuthError(f"users file {self.path} is a directory") from exc
        except OSError as exc:
            raise AuthError(f"users file {self.path}: cannot read: {exc.strerror}") from exc
        text = data.decode("utf-8", "surrogateescape")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines, st

    def reload(self) -> None:
        """Re-read the file now.  A missing file means no users; unreadable is ``AuthError``."""
        with self._lock:
            self._load()

    def _load(self) -> None:
        lines, st = self._read_lines()
        records: builtins.list[UserRecord] = []
        index: dict[str, UserRecord] = {}
        problems: builtins.list[str] = []
        for lineno, raw in enumerate(lines, 1):
            try:
                text = raw.removesuffix("\r")
                text.encode("utf-8")  # undecodable bytes became lone surrogates
                record = _parse_line(text)
            except (ValueError, UnicodeEncodeError) as exc:
                reason = "not valid UTF-8" if isinstance(exc, UnicodeEncodeError) else str(exc)
                problems.append(f"{self.path}:{lineno}: {reason}; line ignored")
                continue
            if record is None:
                continue
            key = _key(record.name)
            if key in index:
                problems.append(f"{self.path}:{lineno}: duplicate user; line ignored")
                continue
            index[key] = record
            records.append(record)
        for problem in problems:
            log.warning("%s", problem)
        self._records, self._index, self.problems = records, index, tuple(problems)
        self._signature = self._sig(st) if st is not None else None
        self._loaded = True

    def _refresh(self) -> None:
        st = self._stat()
        sig = self._sig(st) if st is not None else None
        if self._loaded and sig == self._signature:
            return
        with self._lock:
            self._load()

    def lookup(self, login: str) -> UserRecord | None:
        """The record for ``login``: exact name first, then via ``default_domain``.

        ``local@D`` with ``D`` equal to ``default_domain`` (case-insensitively) also finds
        ``local``; a bare ``login`` also finds ``login@default_domain``.  An invalid login
        finds nothing.  Raises ``AuthError`` if the file exists but cannot be read.
        """
        try:
            login = validate_username(login)
        except InvalidUsername:
            return None
        self._refresh()
        candidates = login_candidates(login, self.default_domain)
        index = self._index
        for candidate in candidates:
            record = index.get(_key(candidate))
            if record is not None:
                return record
        return None

    def list(self) -> builtins.list[UserRecord]:
        """Every valid user, in file order."""
        self._refresh()
        return builtins.list(self._records)

    # --- writing ---------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuthError(f"cannot open lock file {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _rewrite(self, edit: Callable[[builtins.list[str]], None]) -> None:
        """Under the lock: read the current file, let ``edit`` change lines, replace the file."""
        with self._exclusive():
            lines, st = self._read_lines()
            edit(lines)
            self._write(lines, st)
        self.reload()

    def _write(self, lines: builtins.list[str], old: os.stat_result | None) -> None:
        mode = 0o640 if old is not None and old.st_mode & stat.S_IRGRP else 0o600
        directory = self.path.parent
        data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise AuthError(f"cannot write users file {self.path}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                if old is not None:
                    with suppress(PermissionError):  # not root: keep our own ownership
                        os.fchown(f.fileno(), old.st_uid, old.st_gid)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise AuthError(f"cannot write users file {self.path}: {exc.strerror}") from exc
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @staticmethod
    def _find(lines: builtins.list[str], name: str) -> int:
        """Index of the first valid line for ``name`` (exact, domain case-insensitive)."""
        key = _key(name)
        for i, raw in enumerate(lines):
            try:
                record = _parse_line(raw.removesuffix("\r"))
            except ValueError:
                continue
            if record is not None and _key(record.name) == key:
                return i
        return -1

    def _secrets(
        self, password: str, scheme: str, with_scram: bool, apop_secret: str | None,
        params: Argon2Params | None,
    ) -> tuple[str, dict[str, str | None]]:
        """The password field and the ``scram=``/``apop=`` extras (a None value: left out)."""
        stored, scram, apop = make_secrets(
            password, scheme, with_scram=with_scram, apop_secret=apop_secret,
            argon2_params=params or self.argon2_params, scram_iterations=self.scram_iterations,
        )
        return stored, {"scram": scram, "apop": apop}

    def add(
        self,
        name: str,
        password: str,
        *,
        scheme: str = "ARGON2ID",
        with_scram: bool = True,
        apop_secret: str | None = None,
        params: Argon2Params | None = None,
    ) -> UserRecord:
        """Append a user; ``UserExists`` if the name (domain case-insensitive) is taken.

        ``with_scram`` also stores SCRAM-SHA-256 keys (``SASLprepError`` if the password is
        not SASLprep-able; pass False then).  ``apop_secret`` opts in to APOP (see module doc).
        ``params`` overrides the file's Argon2 parameters for this hash.
        """
        name = validate_username(name)
        stored, extras = self._secrets(password, scheme, with_scram, apop_secret, params)
        line = _set_extras(f"{name}:{stored}", extras)

        def edit(lines: builtins.list[str]) -> None:
            if self._find(lines, name) >= 0:
                raise UserExists(f"user {name!r} already exists in {self.path}")
            lines.append(line)

        self._rewrite(edit)
        return self._must_get(name)

    def _update(self, name: str, change: Callable[[str], str]) -> UserRecord:
        name = validate_username(name)

        def edit(lines: builtins.list[str]) -> None:
            i = self._find(lines, name)
            if i < 0:
                raise UnknownUser(f"no user {name!r} in {self.path}")
            lines[i] = change(lines[i].removesuffix("\r"))

        self._rewrite(edit)
        return self._must_get(name)

    def _must_get(self, name: str) -> UserRecord:
        record = self._index.get(_key(name))
        if record is None:  # pragma: no cover - someone edited between rewrite and reload
            raise UnknownUser(f"no user {name!r} in {self.path}")
        return record

    def set_password(
        self,
        name: str,
        password: str,
        *,
        scheme: str = "ARGON2ID",
        with_scram: bool = True,
        apop_secret: str | None = None,
        params: Argon2Params | None = None,
    ) -> UserRecord:
        """Replace the password, the SCRAM keys (dropped if ``with_scram`` is False) and APOP.

        The APOP secret is *replaced* by ``apop_secret``, and removed when that is None:
        APOP secrets are often the old password, which must stop working after a change.
        """
        stored, extras = self._secrets(password, scheme, with_scram, apop_secret, params)

        def change(line: str) -> str:
            parts = line.split(":", 2)
            parts[1] = stored
            return _set_extras(":".join(parts), extras)

        return self._update(name, change)

    def set_apop_secret(self, name: str, secret: str | None) -> UserRecord:
        """Set (or with None, remove) the plaintext APOP secret."""
        if secret is not None:
            check_storable("the APOP secret", secret, allow_colon=True)
        return self._update(name, lambda line: _set_extras(line, {"apop": secret or None}))

    def set_quota(
        self, name: str, bytes: int | None = None, messages: int | None = None
    ) -> UserRecord:
        """Set both limits; None means no limit for that one (the field is removed)."""
        for value in (bytes, messages):
            if value is not None and (isinstance(value, bool) or value < 0):
                raise AuthError(f"quota must be a non-negative integer, not {value!r}")
        updates = {
            "quota_bytes": None if bytes is None else str(int(bytes)),
            "quota_messages": None if messages is None else str(int(messages)),
        }
        return self._update(name, lambda line: _set_extras(line, updates))

    def delete(self, name: str) -> None:
        """Remove the user's line; ``UnknownUser`` if there is none.  Its mail is untouched."""
        name = validate_username(name)

        def edit(lines: builtins.list[str]) -> None:
            i = self._find(lines, name)
            if i < 0:
                raise UnknownUser(f"no user {name!r} in {self.path}")
            del lines[i]

        self._rewrite(edit)

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
import logging
import os
import stat
import threading
from pathlib import Path

from mailbag.auth.schemes import DEFAULT_ARGON2_PARAMS, Argon2Params
from mailbag.auth.user_records import (
    MAX_USERNAME_OCTETS,
    UserDatabase,
    UserExists,
    UserRecord,
    _key,
    _parse_line,
    authenticate,
    check_storable,
    login_candidates,
    lookup_user,
    make_secrets,
    user_key,
    validate_username,
)
from mailbag.auth.users_admin import UsersFileAdmin
from mailbag.errors import AuthError, InvalidUsername

__all__ = [
    "MAX_USERNAME_OCTETS",
    "UserDatabase",
    "UserExists",
    "UserRecord",
    "UsersFile",
    "authenticate",
    "check_storable",
    "login_candidates",
    "lookup_user",
    "make_secrets",
    "user_key",
    "validate_username",
]

log = logging.getLogger(__name__)


class UsersFile(UsersFileAdmin):
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

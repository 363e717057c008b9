"""Admin operations on the users file: add, change and delete accounts safely.

Split from ``users`` (reading and lookups, which every login does) because
writing has its own concerns: a lock shared by every admin process, atomic
replacement (temp file, fsync, ``os.replace``, fsync of the directory),
kept permissions and ownership, and hashing new secrets.  ``UsersFile``
gets these methods from the ``UsersFileAdmin`` mixin.
"""

from __future__ import annotations

import builtins
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mailbag.auth.schemes import Argon2Params
from mailbag.auth.user_records import (
    UserExists,
    UserRecord,
    _key,
    _parse_line,
    _set_extras,
    check_storable,
    make_secrets,
    validate_username,
)
from mailbag.errors import AuthError, UnknownUser


class UsersFileAdmin:
    """The writing half of ``UsersFile`` (a mixin: the reading half provides the hooks)."""

    path: Path
    argon2_params: Argon2Params
    scram_iterations: int
    _index: dict[str, UserRecord]

    def _read_lines(self) -> tuple[builtins.list[str], os.stat_result | None]:
        raise NotImplementedError  # provided by UsersFile

    def reload(self) -> None:
        raise NotImplementedError  # provided by UsersFile

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

"""Dropping root: bind the privileged ports as root, then become an unprivileged account.

Why in this order: ports 110 and 995 need root (or ``CAP_NET_BIND_SERVICE``),
but nothing that parses bytes from the network should ever run as root.  The
server binds its listeners with accepting switched off, calls ``drop``, and
only then starts accepting, so the first network byte is read by the
unprivileged process.

Why refuse root by default: a bug in a network daemon running as root owns
the machine.  Serving as root needs ``process.allow_root = true``, an explicit
and greppable decision.

The switch order is the classic one: supplementary groups, then the gid, then
the uid (after ``setuid`` the process could no longer change its groups),
followed by a check that root cannot be regained.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from mailbag.config import ProcessSettings
from mailbag.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Account:
    """The identity to switch to, resolved from names once, before dropping."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def resolve(settings: ProcessSettings) -> Account | None:
    """Look up ``process.user``/``process.group``; None when no user is configured."""
    if not settings.user:
        if settings.group:
            raise ConfigError("process.group: needs process.user as well")
        return None
    try:
        pw = pwd.getpwnam(settings.user)
    except KeyError:
        raise ConfigError(f"process.user: no such user {settings.user!r}") from None
    gid = pw.pw_gid
    if settings.group:
        try:
            gid = grp.getgrnam(settings.group).gr_gid
        except KeyError:
            raise ConfigError(f"process.group: no such group {settings.group!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, gid))))
    return Account(pw.pw_name, pw.pw_uid, gid, groups)


def check_start(settings: ProcessSettings) -> Account | None:
    """Decide, before binding anything, whether and to whom the process will switch.

    Started as root: a configured user is required unless ``allow_root``.
    Started as anyone else: switching is impossible, so a configured user
    must be the current one (a systemd unit with ``User=`` and the same
    config file both work).
    """
    account = resolve(settings)
    if os.geteuid() == 0:
        if account is None or account.uid == 0:
            if not settings.allow_root:
                raise ConfigError(
                    "refusing to serve as root: set process.user (and process.group) so "
                    "mailbag drops privileges after binding its ports, or set "
                    "process.allow_root = true"
                )
            return None
        return account
    if account is not None and account.uid != os.geteuid():
        current = pwd.getpwuid(os.geteuid()).pw_name
        raise ConfigError(
            f"process.user: {account.user!r} configured, but mailbag runs as {current!r} "
            "(not root) and cannot switch users; start it as root or as that user"
        )
    return None


def drop(account: Account) -> None:
    """Become ``account`` for good (real, effective and saved ids), or raise.

    Raises ``ConfigError`` (the server then exits) rather than carrying on
    with a half-dropped identity.
    """
    try:
        os.setgroups(list(account.groups))
        os.setresgid(account.gid, account.gid, account.gid)
        os.setresuid(account.uid, account.uid, account.uid)
    except OSError as exc:
        raise ConfigError(
            f"process.user: cannot switch to {account.user!r}: {exc.strerror}"
        ) from None
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
        raise ConfigError(f"process.user: switch to {account.user!r} did not take effect")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise ConfigError("process.user: root privileges could be regained after dropping them")


def describe() -> str:
    """``user:group (uid:gid)`` of the running process, for the log."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group} ({uid}:{gid})"

"""Exception families shared by every layer.

Each family maps to one client-visible outcome, so the session layer can turn
any failure into the right POP3 response code (RFC 2449 / RFC 3206) or LMTP
reply without knowing which backend raised it.  The text of these exceptions
is meant for logs and for administrators; the session chooses what the client
sees, so an internal detail never reaches the wire.
"""

from __future__ import annotations


class MailbagError(Exception):
    """Base class of every error mailbag raises on purpose."""


class ConfigError(MailbagError):
    """The configuration is invalid; the message names the key or path."""


class StorageError(MailbagError):
    """A storage operation failed; worth retrying later (POP3 ``[SYS/TEMP]``)."""


class PermanentStorageError(StorageError):
    """A storage failure that retrying will not fix (POP3 ``[SYS/PERM]``)."""


class MaildropLocked(StorageError):
    """Another session holds this maildrop (POP3 ``[IN-USE]``)."""


class MessageGone(StorageError):
    """A message in the session snapshot vanished from storage underneath us."""


class QuotaExceeded(PermanentStorageError):
    """Accepting the message would exceed the recipient's quota (LMTP 552 5.2.2)."""


class MessageTooLarge(PermanentStorageError):
    """The message exceeds the configured maximum size (LMTP 552 5.3.4)."""


class UnknownUser(MailbagError):
    """No such account.  Never shown to POP3 clients as such (no user enumeration)."""


class InvalidUsername(MailbagError):
    """A user name that must not touch the filesystem (path separators, '..', controls)."""


class AuthError(MailbagError):
    """The users file or a password hash could not be read or understood."""

"""Reading what Dovecot leaves behind: ``dovecot-uidlist``, ``pop3_uidl_format``, passwd-files.

Why this matters: a POP3 client that leaves mail on the server remembers the
UIDL of every message it has downloaded.  If the new server reports other
UIDLs, every such client downloads the whole mailbox again.  Dovecot's UIDL
for a Maildir message is, in this order (``src/pop3/pop3-commands.c``,
``src/lib-storage/index/maildir``):

1. the value saved in the message's ``dovecot-uidlist`` line as the ``P``
   extension field (``pop3_save_uidl = yes``, or migrations into Dovecot);
   an *empty* ``P`` means "the file's base name" (a space-saving case);
2. otherwise ``pop3_uidl_format`` expanded for the message (default
   ``%08Xu%08Xv``: the IMAP UID and the folder's UIDVALIDITY in hex).

``dovecot-uidlist`` (version 3)::

    3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1
    25006 :1276528487.M364837P9451.kurkku,S=1355,W=1394:2,
    25017 W2481 P0000627a4c0ac4b0 :1276533073.M242911P3632.kurkku

The header carries UIDVALIDITY (``V``), the next UID (``N``) and the
mailbox GUID (``G``); each line a UID, extension fields (one letter, then
the value) and, after ``:``, the file name (flags, if any, after the first
``:`` of the name are irrelevant: a Maildir message's identity is its base
name).  Version 1 (``1 <uidvalidity> <nextuid>``, lines ``<uid> <name>``)
is read too.

Nothing here writes anything; ``migrate.run`` does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailbag.errors import ConfigError, MailbagError

UIDLIST_FILE = "dovecot-uidlist"
DEFAULT_UIDL_FORMAT = "%08Xu%08Xv"


class UidlistError(MailbagError):
    """A ``dovecot-uidlist`` that cannot be trusted (guessing UIDLs would be worse)."""


def base_name(filename: str) -> str:
    """The Maildir base name: everything before the first ``:`` (flags follow it)."""
    return filename.split(":", 1)[0]


@dataclass(frozen=True, slots=True)
class UidlistRecord:
    """One message as Dovecot numbered it."""

    uid: int
    key: str
    ext: dict[str, str] = field(default_factory=dict)

    @property
    def saved_uidl(self) -> str | None:
        """The ``P`` field (``pop3_save_uidl``), resolved; None when there is none."""
        value = self.ext.get("P")
        if value is None:
            return None
        return value or self.key

    @property
    def guid(self) -> str:
        """Dovecot's GUID of a Maildir message: the ``G`` field, else the base name."""
        return self.ext.get("G") or self.key


@dataclass(frozen=True, slots=True)
class Uidlist:
    """A parsed ``dovecot-uidlist``."""

    version: int
    uidvalidity: int
    next_uid: int
    guid: str
    records: tuple[UidlistRecord, ...]


def parse_uidlist(text: str, *, source: str = UIDLIST_FILE) -> Uidlist:
    """Parse a version 1 or 3 uidlist; ``UidlistError`` naming the line if it is damaged."""
    lines = text.split("\n")
    header = lines[0].split()
    if not header or not header[0].isdigit():
        raise UidlistError(f"{source}:1: not a dovecot-uidlist header")
    version = int(header[0])
    uidvalidity = next_uid = 0
    guid = ""
    if version == 1:
        if len(header) < 3 or not header[1].isdigit() or not header[2].isdigit():
            raise UidlistError(f"{source}:1: bad version 1 header")
        uidvalidity, next_uid = int(header[1]), int(header[2])
    elif version in (2, 3):
        for item in header[1:]:
            key, value = item[:1], item[1:]
            if key == "V" and value.isdigit():
                uidvalidity = int(value)
            elif key == "N" and value.isdigit():
                next_uid = int(value)
            elif key == "G":
                guid = value
    else:
        raise UidlistError(f"{source}:1: unsupported dovecot-uidlist version {version}")
    if uidvalidity == 0:
        raise UidlistError(f"{source}:1: no UIDVALIDITY in the header")
    records: list[UidlistRecord] = []
    last_uid = 0
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        uid_text, _, rest = line.partition(" ")
        if not uid_text.isdigit() or not rest:
            raise UidlistError(f"{source}:{lineno}: bad record")
        uid = int(uid_text)
        if uid <= last_uid:
            raise UidlistError(f"{source}:{lineno}: UIDs not ascending")
        last_uid = uid
        ext: dict[str, str] = {}
        if version == 1:
            name = rest
        else:
            marker = rest.find(":") if rest.startswith(":") else rest.find(" :")
            if marker < 0:  # version 2 without extension fields: "<uid> <flags> <name>"
                name = rest.rsplit(" ", 1)[-1]
            else:
                ext_text = rest[:marker]
                name = rest[marker + (1 if rest.startswith(":") else 2) :]
                for item in ext_text.split():
                    ext[item[:1]] = item[1:]
        if not name:
            raise UidlistError(f"{source}:{lineno}: record without a file name")
        records.append(UidlistRecord(uid, base_name(name), ext))
    return Uidlist(version, uidvalidity, next_uid, guid, tuple(records))


def read_uidlist(maildir: Path) -> Uidlist | None:
    """The uidlist of ``maildir``; None when Dovecot never wrote one."""
    path = maildir / UIDLIST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UidlistError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_uidlist(data.decode("utf-8", "surrogateescape"), source=str(path))


# -- pop3_uidl_format ---------------------------------------------------------

#: The variables Dovecot 2.3 accepts in ``pop3_uidl_format``.
_VARIABLES = {"u": "uid", "v": "uidvalidity", "f": "filename", "g": "guid", "m": "md5"}


def _hex(value: str) -> str:
    # Dovecot's %X: the value as a base-10 number, printed in lower-case hex.
    return format(int(value or "0"), "x")


_MODIFIERS: dict[str, Callable[[str], str]] = {
    "L": str.lower,
    "U": str.upper,
    "X": _hex,
    "R": lambda v: v[::-1],
    "M": lambda v: hashlib.md5(v.encode("utf-8", "surrogateescape")).hexdigest(),
    "T": str.rstrip,
}
#: Modifiers Dovecot has but this reader does not (rarely, if ever, used in UIDL formats).
_UNSUPPORTED_MODIFIERS = frozenset("EHNDSAB")


@dataclass(frozen=True, slots=True)
class _Piece:
    literal: str = ""
    variable: str = ""
    modifiers: str = ""
    offset: int = 0
    width: int = 0
    zero_padding: bool = False


class UidlFormat:
    """``pop3_uidl_format`` as Dovecot's ``var_expand`` interprets it.

    Syntax per variable: ``%[-][0]<width>[.[0][-]<width>]<modifiers><var>``;
    ``%08Xu`` is "UID, as hex, zero-padded to 8".  ``%m`` (a header MD5 that
    Dovecot computes only for mbox) is refused: there is no way to know
    what Dovecot reported, and a wrong guess would make clients download
    everything again.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pieces = self._parse(text)

    def __repr__(self) -> str:
        return f"UidlFormat({self.text!r})"

    @staticmethod
    def _parse(text: str) -> tuple[_Piece, ...]:
        pieces: list[_Piece] = []
        i, n = 0, len(text)

        def fail(why: str) -> ConfigError:
            return ConfigError(f"pop3_uidl_format {text!r}: {why}")

        while i < n:
            if text[i] != "%":
                j = text.find("%", i)
                j = n if j < 0 else j
                pieces.append(_Piece(literal=text[i:j]))
                i = j
                continue
            i += 1
            sign, zero, width, offset = 1, False, 0, 0
            if i < n and text[i] == "-":
                sign, i = -1, i + 1
            if i < n and text[i] == "0":
                zero, i = True, i + 1
            while i < n and text[i].isdigit():
                width, i = width * 10 + int(text[i]), i + 1
            if i < n and text[i] == ".":
                offset, sign, width, zero, i = sign * width, 1, 0, False, i + 1
                if i < n and text[i] == "0":
                    zero, i = True, i + 1
                if i < n and text[i] == "-":
                    sign, i = -1, i + 1
                while i < n and text[i].isdigit():
                    width, i = width * 10 + int(text[i]), i + 1
            width *= sign
            modifiers = ""
            while i < n and (text[i] in _MODIFIERS or text[i] in _UNSUPPORTED_MODIFIERS):
                if text[i] in _UNSUPPORTED_MODIFIERS:
                    raise fail(f"modifier %{text[i]} is not supported by this migration")
                modifiers, i = modifiers + text[i], i + 1
            if i >= n:
                raise fail("ends inside a variable")
            char = text[i]
            i += 1
            if char == "%":
                pieces.append(_Piece(literal="%"))
                continue
            if char not in _VARIABLES:
                raise fail(f"unknown variable %{char} (Dovecot knows %u %v %f %g %m)")
            if char == "m":
                raise fail(
                    "%m (header MD5) is only computed by Dovecot for mbox; it cannot be "
                    "reproduced here"
                )
            pieces.append(_Piece("", char, modifiers, offset, width, zero))
        return tuple(pieces)

    def expand(self, *, uid: int, uidvalidity: int, filename: str, guid: str) -> str:
        """The UIDL Dovecot reports for a message with these properties."""
        values = {"u": str(uid), "v": str(uidvalidity), "f": filename, "g": guid}
        out: list[str] = []
        for piece in self.pieces:
            if not piece.variable:
                out.append(piece.literal)
                continue
            value = values[piece.variable]
            for modifier in piece.modifiers:
                value = _MODIFIERS[modifier](value)
            if piece.offset < 0:
                value = value[max(len(value) + piece.offset, 0) :]
            else:
                value = value[piece.offset :]
            width = piece.width
            if width == 0:
                out.append(value)
            elif not piece.zero_padding:
                out.append(value[: width if width > 0 else max(len(value) + width, 0)])
            else:
                out.append(value.rjust(width, "0"))
        return "".join(out)


def dovecot_uidl(record: UidlistRecord, uidlist: Uidlist, fmt: UidlFormat) -> tuple[str, bool]:
    """``(uidl, saved)``: what Dovecot's POP3 reports for ``record``, and whether it was saved."""
    saved = record.saved_uidl
    if saved is not None:
        return saved, True
    return (
        fmt.expand(
            uid=record.uid, uidvalidity=uidlist.uidvalidity, filename=record.key,
            guid=record.guid,
        ),
        False,
    )


# -- passwd-file and mail location ---------------------------------------------


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    """One line of a Dovecot passwd-file (the line is kept to copy it verbatim)."""

    lineno: int
    line: str
    name: str
    password: str
    home: str


def read_passwd_file(path: Path) -> list[PasswdEntry]:
    """The entries of a passwd-file (``user:password:uid:gid:gecos:home:shell:extra``)."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ConfigError(f"--passwd-file: {path}: {exc.strerror}") from None
    entries = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":", 7)
        fields += [""] * (8 - len(fields))
        entries.append(PasswdEntry(lineno, line, fields[0], fields[1], fields[5]))
    return entries


def maildir_location(template: str, *, user: str, home: str) -> Path:
    """Expand a mail location for ``user``.

    Accepts Dovecot's syntax (``maildir:%h/Maildir:LAYOUT=fs``, ``~/Maildir``,
    ``%u``, ``%n``, ``%d``, ``%h``, ``%Lu`` lower-cased) and mailbag's
    (``{user}``, ``{local}``, ``{domain}``, ``{home}``), so an administrator
    can paste ``mail_location`` from ``doveconf`` as is.
    """
    text = template
    if text.startswith("maildir:"):
        text = text[len("maildir:") :]
    text = text.split(":", 1)[0]  # drop :INDEX=..., :LAYOUT=... options
    local, at, domain = user.rpartition("@")
    if not at:
        local, domain = user, ""
    values = {"u": user, "n": local, "d": domain, "h": home}
    if ("%h" in text or "{home}" in text or text.startswith("~")) and not home:
        raise ConfigError(f"{user}: the mail location uses the home directory, but the "
                          "passwd-file line has none")
    if text.startswith("~"):
        text = home + text[1:]
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%" and i + 1 < len(text):
            mod = ""
            j = i + 1
            if text[j] in "LU" and j + 1 < len(text):
                mod, j = text[j], j + 1
            var = text[j]
            if var == "%":
                out.append("%")
            elif var in values:
                value = values[var]
                out.append(value.lower() if mod == "L" else value.upper() if mod == "U" else value)
            else:
                raise ConfigError(f"--maildir-template: unsupported variable %{var}")
            i = j + 1
            continue
        out.append(ch)
        i += 1
    expanded = "".join(out).format(user=user, local=local, domain=domain, home=home)
    return Path(os.path.normpath(expanded))

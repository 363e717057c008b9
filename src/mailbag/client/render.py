"""MIME message -> what a person wants to read: headers, one body, attachments.

Parsing is the standard library's (``email`` with ``policy.default``: it is
tolerant of broken structure and records defects instead of raising).  What
we add is the part the standard library leaves to the application: choosing
the body to show, decoding it with a charset that may be a lie, turning
HTML-only mail into text, naming attachments whose names are RFC 2231 or
RFC 2047 encoded (or raw GBK bytes), and decoding headers around the CPython
bugs described in :mod:`mailbag.client.headers`.

The result is a plain dataclass so the terminal view, ``--json`` and the
shell all show the same thing.
"""

from __future__ import annotations

import datetime as dt
import mimetypes
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import unquote
from typing import IO, Any

from mailbag.client.charsets import Decoded, HeaderHints, decode_bytes, decode_header_bytes
from mailbag.client.flowed import unflow
from mailbag.client.headers import (
    Hints,
    decode_words,
    format_addresses,
    has_raw_bytes,
    parse_date,
    printable,
    raw_bytes,
)
from mailbag.client.htmltext import html_to_text, meta_charset

_PARSER = BytesParser(policy=policy.default)
_WORD_CHARSET = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?[QqBb]\?")
_RAW_WORD = re.compile(r"\S*[\udc80-\udcff]\S*")
#: Shown instead of a body when a message has no text part at all.
NO_TEXT_NOTICE = "no text part: this message is only an attachment (listed below)"


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment as listed by ``read`` and written by ``save``."""

    index: int
    filename: str
    content_type: str
    size: int
    part: Message = field(repr=False, compare=False)

    def payload(self) -> bytes:
        """The decoded content (base64 / quoted-printable undone)."""
        data = self.part.get_payload(decode=True)
        return data if isinstance(data, bytes) else self.part.as_bytes()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready description (without the content)."""
        return {
            "index": self.index,
            "filename": self.filename,
            "content_type": self.content_type,
            "size": self.size,
        }


@dataclass(frozen=True, slots=True)
class Rendered:
    """A message decoded for display."""

    subject: str
    sender: str
    to: str
    cc: str
    date: dt.datetime | None
    message_id: str
    body: str
    body_type: str
    charset_note: str | None
    attachments: list[Attachment]
    defects: list[str]
    notice: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form used by ``read --json``."""
        return {
            "subject": self.subject,
            "from": self.sender,
            "to": self.to,
            "cc": self.cc,
            "date": self.date.isoformat() if self.date else None,
            "message_id": self.message_id,
            "body": self.body,
            "body_type": self.body_type,
            "charset_note": self.charset_note,
            "attachments": [a.to_json() for a in self.attachments],
            "defects": self.defects,
            "notice": self.notice,
        }


def parse_bytes(data: bytes) -> EmailMessage:
    """Parse a whole message held in memory."""
    msg = _PARSER.parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def parse_file(fp: IO[bytes]) -> EmailMessage:
    """Parse a message from a binary file (e.g. the spool RETR wrote)."""
    msg = _PARSER.parse(fp)
    assert isinstance(msg, EmailMessage)
    return msg


def raw_header(msg: Message, name: str) -> str | None:
    """The undecoded value of the first ``name`` header (see headers.py why)."""
    wanted = name.lower()
    for key, value in msg.raw_items():
        if key.lower() == wanted:
            return str(value)
    return None


def header_hints(msg: Message) -> HeaderHints:
    """What the message tells about raw 8-bit header bytes (see ``HeaderHints``).

    Declared: every part's ``charset=``, then the charsets of its RFC 2047
    encoded-words (a mailer that writes ``=?gbk?B?...?=`` in one header
    writes GBK in the raw ones too).  Sample: every raw 8-bit word of every
    header of every part, for detection.
    """
    declared: list[str] = []
    sample: list[bytes] = []
    parts = list(msg.walk())
    for part in parts:
        charset = part.get_param("charset")
        if isinstance(charset, str) and charset and charset not in declared:
            declared.append(charset)
    for part in parts:
        for _name, value in part.raw_items():
            text = str(value)
            for label in _WORD_CHARSET.findall(text):
                if label not in declared:
                    declared.append(label)
            if has_raw_bytes(text):
                sample.extend(raw_bytes(word) for word in _RAW_WORD.findall(text))
    return HeaderHints(tuple(declared), b" ".join(sample))


def header_text(msg: Message, name: str, hint: Hints = None) -> str:
    """Decoded unstructured header (Subject and friends); empty if absent."""
    raw = raw_header(msg, name)
    return decode_words(raw, hint) if raw is not None else ""


def address_text(msg: Message, name: str, hint: Hints = None) -> str:
    """Decoded address header (From/To/Cc) on one line; empty if absent."""
    raw = raw_header(msg, name)
    return format_addresses(raw, hint) if raw is not None else ""


def attachment_name(part: Message, hint: Hints = None) -> str | None:
    """The attachment's file name, decoded from RFC 2231, RFC 2047 or raw bytes.

    The parameters are re-parsed from the *raw* header with a compat32
    ``Message`` because it returns RFC 2231 values as (charset, language,
    octets) and leaves charset handling to us: a ``gb2312``-labelled
    name with GBK bytes then decodes as gb18030 instead of turning into
    replacement characters.  compat32 would itself turn raw 8-bit bytes
    into U+FFFD, so they go in as Latin-1 (one character per octet) and come
    back out as the original octets for ``decode_header_bytes``.
    """
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        raw = raw_header(part, header)
        if raw is None:
            continue
        scratch = Message()
        scratch[header] = raw_bytes(raw.replace("\r", "").replace("\n", "")).decode("latin-1")
        value = scratch.get_param(param, header=header)
        if value is None:
            continue
        if isinstance(value, tuple):
            charset, _lang, text = value
            octets = text.encode("latin-1", "surrogateescape")
            decoded = decode_bytes(octets, charset) if charset else None
            if decoded is None or decoded.lossy:
                decoded = decode_header_bytes(octets, hint)
            name = decoded.text
        else:
            octets = unquote(value).encode("latin-1", "replace")
            name = decode_words(octets.decode("ascii", "surrogateescape"), hint)
        name = printable(name, single_line=True).strip()
        if name:
            return name
    return None


def _decode_part(part: Message) -> tuple[str, Decoded]:
    """Decode a text part's content; returns (content type, decoded text)."""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        payload = part.get_payload()
        data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
    ctype = part.get_content_type()
    label = part.get_content_charset()
    if label is None and ctype == "text/html":
        label = meta_charset(data)
    return ctype, decode_bytes(data, label)


def _walk(part: Message, parent: str = "") -> Iterator[tuple[Message, str]]:
    """Leaf parts with their parent's type; message/rfc822 is a leaf here."""
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for sub in part.get_payload():
            assert isinstance(sub, Message)
            yield from _walk(sub, part.get_content_type())
    else:
        yield part, parent


def choose_body(msg: EmailMessage) -> Message | None:
    """The part to show: text/plain preferred, HTML if that is all there is.

    ``get_body`` implements RFC 2046's "last alternative the reader
    understands" walk; when it finds nothing (broken structure, odd types)
    the first inline text part wins.  A message whose only part is not
    text (a bare PDF) or is an attachment has no body: binary content must
    never reach the terminal, so it is listed as an attachment instead.
    """
    try:
        body = msg.get_body(preferencelist=("plain", "html"))
    except (KeyError, TypeError, ValueError, AttributeError):
        body = None
    if body is not None:
        return body
    for part, _parent in _walk(msg):
        if part.get_content_maintype() == "text" and part.get_content_disposition() != "attachment":
            return part
    if not msg.is_multipart() and msg.get_content_maintype() == "multipart":
        return msg  # a multipart without a boundary: its payload is text
    return None


def _attachments(msg: EmailMessage, body: Message | None, hint: Hints) -> list[Attachment]:
    found: list[Attachment] = []
    for part, parent in _walk(msg):
        if part is body:
            continue
        ctype = part.get_content_type()
        name = attachment_name(part, hint)
        disposition = part.get_content_disposition()
        is_alternative_text = parent == "multipart/alternative" and ctype.startswith("text/")
        if name is None and (is_alternative_text or
                             (ctype.startswith("text/") and disposition != "attachment")):
            continue
        if ctype.startswith("multipart/"):
            continue  # a multipart without a boundary: its text is the body already
        data = part.get_payload(decode=True)
        size = len(data) if isinstance(data, bytes) else len(part.as_bytes())
        if name is None:
            ext = ".eml" if ctype == "message/rfc822" else (mimetypes.guess_extension(ctype) or "")
            name = f"part-{len(found) + 1}{ext}"
        found.append(Attachment(len(found) + 1, name, ctype, size, part))
    return found


def _param(part: Message, name: str) -> str:
    value = part.get_param(name)
    return value.strip().lower() if isinstance(value, str) else ""


def render(msg: EmailMessage) -> Rendered:
    """Decode ``msg`` into a :class:`Rendered`."""
    hint = header_hints(msg)
    body_part = choose_body(msg)
    body, body_type, note = "", "", None
    attachments = _attachments(msg, body_part, hint)
    notice = NO_TEXT_NOTICE if body_part is None and attachments else None
    if body_part is not None:
        body_type, decoded = _decode_part(body_part)
        note = decoded.note
        body = html_to_text(decoded.text) if body_type == "text/html" else decoded.text
        body = body.replace("\r\n", "\n")
        if body_type == "text/plain" and _param(body_part, "format") == "flowed":
            body = unflow(body, delsp=_param(body_part, "delsp") == "yes")
        body = printable(body)
    return Rendered(
        subject=header_text(msg, "subject", hint),
        sender=address_text(msg, "from", hint),
        to=address_text(msg, "to", hint),
        cc=address_text(msg, "cc", hint),
        date=parse_date(raw_header(msg, "date")),
        message_id=header_text(msg, "message-id"),
        body=body,
        body_type=body_type,
        charset_note=note,
        attachments=attachments,
        defects=sorted({type(d).__name__ for p in msg.walk() for d in p.defects}),
        notice=notice,
    )


def has_attachments(msg: Message) -> bool:
    """Guess from headers alone (``TOP n 0``) whether a message has attachments.

    multipart/mixed is what every mailer uses for "body plus files"; a
    top-level non-text type (a bare PDF) counts too.
    """
    ctype = msg.get_content_type()
    return (ctype in {"multipart/mixed", "multipart/report"}
            or msg.get_content_maintype() not in {"text", "multipart"}
            or msg.get_content_disposition() == "attachment")


_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
             *(f"lpt{i}" for i in range(10))}


def safe_filename(name: str, fallback: str = "attachment") -> str:
    """A file name that stays inside the target directory on any OS.

    Only the last path component survives (both ``/`` and ``\\``), reserved
    characters become ``_``, leading dots are dropped (no hidden files, no
    ``..``), Windows device names are prefixed, and the name is cut to 200
    UTF-8 bytes keeping its extension.
    """
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name)[-1]
    name = _UNSAFE.sub("_", name).strip().lstrip(".").strip()
    if not name:
        name = fallback
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    if stem.lower() in _RESERVED:
        name = "_" + name
    while len(name.encode("utf-8")) > 200:
        if stem and len(stem) > 1:
            stem = stem[:-1]
            name = f"{stem}.{ext}" if ext else stem
        else:
            name = name[:-1]
    return name

"""Decode header fields the way mail readers do, not the way the RFC hopes.

``email.policy.default`` decodes RFC 2047 encoded-words itself, but on
Python 3.11-3.13 it inserts spaces between adjacent encoded-words that were
folded across lines (cpython #79728) or that make up an address display
name (cpython #128110): "Dûbois-Béna rd", "прохо в".  It also decodes each
encoded-word on its own, so a multi-byte character split across two words
(forbidden by RFC 2047 section 5, yet produced by many mailers) becomes two
replacement characters.  We therefore read the *raw* header strings
(``Message.raw_items``) and decode them here:

* whitespace between two encoded-words is dropped (RFC 2047 section 6.2);
* consecutive encoded-words in the same charset are joined as *bytes* and
  decoded once, which repairs split characters;
* labels go through :mod:`mailbag.client.charsets` (gb2312 -> gb18030 ...);
* raw 8-bit bytes in headers (common in old Chinese mail) are recovered from
  the parser's surrogate escapes and decoded with the message's body charset
  as a hint, as Thunderbird does;
* control characters are neutralised so a header cannot drive the terminal.
"""

from __future__ import annotations

import binascii
import datetime as dt
import re
from email.utils import getaddresses, parsedate_to_datetime

from mailbag.client.charsets import decode_bytes, normalize_label

_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?]*?)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATES = re.compile(r"[\udc80-\udcff]")


def printable(text: str, *, single_line: bool = False) -> str:
    """Replace control characters (ANSI escapes included) with U+FFFD.

    RFC 2047 section 7 asks readers to make sure decoded text cannot have
    "unwanted side-effects" on the terminal; an ESC in a subject could
    otherwise retitle the window or hide text.
    """
    if single_line:
        text = text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    return _CONTROLS.sub("\ufffd", text)


def _word_bytes(encoding: str, payload: str) -> bytes:
    """Decode one encoded-text to bytes, leniently (missing padding, junk)."""
    if encoding in "Bb":
        cleaned = re.sub(r"[^A-Za-z0-9+/]", "", payload)
        cleaned += "=" * (-len(cleaned) % 4)
        try:
            return binascii.a2b_base64(cleaned.encode("ascii"))
        except binascii.Error:
            # A single stray character (length % 4 == 1) cannot be decoded.
            return binascii.a2b_base64(cleaned[: len(cleaned) // 4 * 4].encode("ascii"))
    return binascii.a2b_qp(payload.encode("ascii", "replace"), header=True)


def _raw_text(segment: str, hint: str | None) -> str:
    """Decode a non-encoded segment that may hold raw 8-bit bytes."""
    if not _SURROGATES.search(segment):
        return segment
    raw = segment.encode("utf-8", "surrogateescape")
    return decode_bytes(raw, hint).text if hint else decode_bytes(raw).text


def decode_words(value: str, hint: str | None = None) -> str:
    """Decode every encoded-word in an unstructured header value.

    ``hint`` is the charset to try for raw 8-bit bytes (usually the body's).
    Encoded-words glued to text without whitespace are decoded too:
    Outlook, old Foxmail and list managers ("[list]=?gbk?B?...?=") do it.
    """
    value = _FOLD.sub("", value)
    out: list[str] = []
    pending: bytearray = bytearray()
    pending_cs: str | None = None
    pending_label = ""
    pos = 0

    def flush() -> None:
        nonlocal pending_cs
        if pending_cs is not None or pending:
            out.append(decode_bytes(bytes(pending), pending_label).text)
        pending.clear()
        pending_cs = None

    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        label, encoding, payload = match.group(1), match.group(2), match.group(3)
        codec = normalize_label(label) or label.lower()
        if between and not (between.isspace() and (pending or pending_cs is not None)):
            flush()
            out.append(_raw_text(between, hint))
        if pending_cs is not None and codec != pending_cs:
            flush()
        pending_cs, pending_label = codec, label
        pending.extend(_word_bytes(encoding, payload))
        pos = match.end()
    flush()
    out.append(_raw_text(value[pos:], hint))
    return printable("".join(out), single_line=True).strip()


def decode_addresses(value: str, hint: str | None = None) -> list[tuple[str, str]]:
    """Split an address header into ``(display name, address)`` pairs.

    The raw value is split *before* decoding (RFC 2047 section 6.2 note: a
    decoded name may contain commas or angle brackets), then each name is
    decoded with :func:`decode_words`; this also decodes encoded-words inside
    quoted strings, which the RFC forbids but Chinese webmail produces.
    """
    unfolded = _FOLD.sub("", value)
    pairs = getaddresses([unfolded])
    result: list[tuple[str, str]] = []
    for name, addr in pairs:
        if not name and not addr:
            continue
        result.append((decode_words(name, hint), printable(addr, single_line=True)))
    if not result and unfolded.strip():
        result.append((decode_words(unfolded, hint), ""))
    return result


def format_address(name: str, addr: str) -> str:
    """Render one address for display: ``Name <addr>``, or whichever exists."""
    if name and addr and name != addr:
        return f"{name} <{addr}>"
    return name or addr


def format_addresses(value: str, hint: str | None = None) -> str:
    """Decode and render a whole address header on one line."""
    return ", ".join(format_address(n, a) for n, a in decode_addresses(value, hint))


def parse_date(value: str | None) -> dt.datetime | None:
    """Parse an RFC 5322 date leniently; None when it is missing or garbage."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(_FOLD.sub("", value).strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def short_date(when: dt.datetime | None) -> str:
    """A compact date for tables, in the sender's own offset (deterministic)."""
    return when.strftime("%Y-%m-%d %H:%M") if when else ""

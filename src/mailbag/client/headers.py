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
  the parser's surrogate escapes and decoded by
  :func:`mailbag.client.charsets.decode_header_bytes` -- UTF-8, then the
  charsets the message declares, then detection -- the one code path for
  subjects, display names and attachment names;
* control characters are neutralised so a header cannot drive the terminal.
"""

from __future__ import annotations

import binascii
import datetime as dt
import re
from email.utils import getaddresses, parsedate_to_datetime

from mailbag.client.charsets import HeaderHints, decode_bytes, decode_header_bytes, normalize_label

#: What callers may pass as the charset hint for raw 8-bit header bytes.
Hints = HeaderHints | str | None

_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?]*?)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATES = re.compile(r"[\udc80-\udcff]")


def _picture(match: re.Match[str]) -> str:
    """C0 controls as their Unicode Control Pictures (ESC -> U+241B), DEL as U+2421."""
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)
    return "\u2421" if code == 0x7F else "\ufffd"  # C1 controls have no pictures


def printable(text: str, *, single_line: bool = False) -> str:
    """Make control characters (ANSI escapes included) visible and harmless.

    RFC 2047 section 7 asks readers to make sure decoded text cannot have
    "unwanted side-effects" on the terminal; an ESC in a subject could
    otherwise retitle the window or hide text.  Tab and newline stay (unless
    ``single_line``); other C0 controls and DEL become Control Pictures
    (``␛``), C1 controls U+FFFD.
    """
    if single_line:
        text = text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    return _CONTROLS.sub(_picture, text)


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


def raw_bytes(segment: str) -> bytes:
    """The original octets of a parsed header string (8-bit bytes are surrogate escapes)."""
    return segment.encode("utf-8", "surrogateescape")


def has_raw_bytes(segment: str) -> bool:
    """Whether a parsed header string holds undecoded 8-bit bytes."""
    return _SURROGATES.search(segment) is not None


def _raw_text(segment: str, hint: Hints) -> str:
    """Decode a non-encoded segment that may hold raw 8-bit bytes."""
    if not has_raw_bytes(segment):
        return segment
    return decode_header_bytes(raw_bytes(segment), hint).text


def decode_words(value: str, hint: Hints = None) -> str:
    """Decode every encoded-word in an unstructured header value.

    ``hint`` tells how to read raw 8-bit bytes (see ``decode_header_bytes``).
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


def decode_addresses(value: str, hint: Hints = None) -> list[tuple[str, str]]:
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


def format_addresses(value: str, hint: Hints = None) -> str:
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

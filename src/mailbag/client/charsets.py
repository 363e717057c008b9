"""Turn bytes from mail into text without mojibake.

Mail in the wild rarely says the truth about its charset.  The classic case
for Chinese mail is ``charset=gb2312`` on bytes that are really GBK or
GB18030 (any character outside the 6,763 of GB 2312 -- 镕, 喆, 珺, the euro
sign -- makes a strict gb2312 decoder fail).  Browsers and Thunderbird solved
this long ago by *decoding labels as their superset*: the WHATWG Encoding
Standard maps gb2312, gbk, cp936, x-gbk and euc-cn to GB18030, big5 to
Big5-HKSCS, iso-8859-1 and us-ascii to windows-1252, and so on.  We do the
same, then fall back to ``charset-normalizer`` when a label is missing,
unknown or plainly wrong, and only then to replacement characters.

Every decode returns the codec that worked so the UI can say "declared
gb2312, decoded as gb18030" instead of silently guessing.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import charset_normalizer

#: Labels decoded as a superset (WHATWG Encoding Standard, plus mail habits).
SUPERSETS: dict[str, str] = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "cp936": "gb18030",
    "ms936": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "euccn": "gb18030",
    "csgb2312": "gb18030",
    "chinese": "gb18030",
    "gb_2312-80": "gb18030",
    "iso-ir-58": "gb18030",
    "hz-gb-2312": "hz",
    "big5": "big5hkscs",
    "x-x-big5": "big5hkscs",
    "cn-big5": "big5hkscs",
    "cp950": "big5hkscs",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "windows-31j": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
    "csiso2022jp": "iso2022_jp_ext",
    "euc-jp": "euc_jis_2004",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "korean": "cp949",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "iso-8859-9": "cp1254",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "utf8": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
    "x-unknown": "",
    "unknown-8bit": "",
    "x-user-defined": "",
    "default": "",
}

#: Labels that promise 7-bit text: 8-bit bytes under them mean the label lies.
_SEVEN_BIT = {"us-ascii", "ascii", "ansi_x3.4-1968", "iso646-us"}


@dataclass(frozen=True, slots=True)
class Decoded:
    """Text plus how it was obtained (for display and for ``--json``)."""

    text: str
    declared: str | None
    used: str
    guessed: bool = False
    lossy: bool = False

    @property
    def note(self) -> str | None:
        """A short human note when the declared charset was not the one used."""
        if self.lossy:
            return f"undecodable bytes replaced (tried {self.used})"
        if self.guessed:
            label = self.declared or "none"
            return f"charset declared {label}, detected {self.used}"
        return None


def normalize_label(label: str | None) -> str | None:
    """Map a MIME charset label to a Python codec name, or None if unknown.

    Superset mapping comes first; unknown labels return None so the caller
    can fall back to detection instead of raising ``LookupError``.
    """
    if not label:
        return None
    key = label.strip().strip("\"'").lower()
    if key in SUPERSETS:
        return SUPERSETS[key] or None
    try:
        return codecs.lookup(key).name
    except LookupError:
        return None


#: Codecs that header detection chooses from: what mail in the wild uses.  Left
#: free, charset-normalizer reads a short Latin-1 name as UTF-16 or GBK bytes
#: as an Urdu DOS code page.
MAIL_CODECS = ("utf_8", "gb18030", "big5hkscs", "cp932", "euc_jp", "cp949", "koi8_r",
               "koi8_u", "cp1250", "cp1251", "cp1252", "cp1253", "cp1254", "cp1255",
               "cp1256", "cp1257", "cp1258", "cp874", "iso8859_2", "iso8859_5",
               "iso8859_7", "iso8859_15")


def _detect(data: bytes, among: tuple[str, ...] | None = None) -> str | None:
    """Ask charset-normalizer for the most plausible codec, if any."""
    matches = (charset_normalizer.from_bytes(data, cp_isolation=list(among)) if among
               else charset_normalizer.from_bytes(data))
    best = matches.best()
    if best is None:
        return None
    name = normalize_label(best.encoding)
    return name or best.encoding


def decode_bytes(data: bytes, declared: str | None = None) -> Decoded:
    """Decode ``data`` honouring ``declared`` where it is plausible.

    Order: the declared label's superset, strictly; for missing, 7-bit or
    unknown labels UTF-8 first (it almost never decodes non-UTF-8 text by
    accident); then detection; then the label (or UTF-8) with replacement
    characters, flagged ``lossy``.
    """
    label = declared.strip().lower() if declared else None
    codec = normalize_label(label)
    if not data:
        return Decoded("", declared, codec or "utf-8")
    ascii_only = data.isascii()
    if ascii_only and b"\x1b$" in data and (codec is None or label in _SEVEN_BIT):
        # Unlabelled ISO-2022-JP: 7-bit bytes with escape sequences.
        try:
            return Decoded(data.decode("iso2022_jp_ext"), declared, "iso2022_jp_ext", True)
        except UnicodeDecodeError:
            pass
    if ascii_only and codec not in {"utf-7", "hz"} and not _is_7bit_stateful(codec):
        return Decoded(data.decode("ascii"), declared, codec or "us-ascii")
    trusted = codec is not None and label not in _SEVEN_BIT
    if trusted and codec is not None:
        try:
            return Decoded(data.decode(codec), declared, codec)
        except (UnicodeDecodeError, LookupError):
            pass
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return Decoded(text, declared, "utf-8", guessed=declared is not None)
    detected = _detect(data)
    if detected:
        try:
            return Decoded(data.decode(detected), declared, detected, guessed=True)
        except (UnicodeDecodeError, LookupError):
            pass
    fallback = codec or "utf-8"
    return Decoded(data.decode(fallback, errors="replace"), declared, fallback, lossy=True)


def _is_7bit_stateful(codec: str | None) -> bool:
    """ISO-2022 encodings are pure ASCII bytes that still need decoding."""
    return codec is not None and codec.startswith("iso2022")


def decode_text(data: bytes, declared: str | None = None) -> str:
    """Convenience wrapper returning only the text."""
    return decode_bytes(data, declared).text


@dataclass(frozen=True, slots=True)
class HeaderHints:
    """What a message says about the charset of raw 8-bit bytes in its headers.

    ``declared``: charset labels the message itself uses (``charset=``
    parameters of its parts, then the charsets of its RFC 2047 encoded-words),
    in order of appearance.  ``sample``: all raw 8-bit header bytes of the
    message together, so detection sees whole subjects and names at once
    instead of a two-character display name (charset-normalizer reads the
    GBK bytes of "李四" alone as Big5).
    """

    declared: tuple[str, ...] = ()
    sample: bytes = b""

    @classmethod
    def of(cls, hints: HeaderHints | str | None) -> HeaderHints:
        """Accept a bare label (one declared charset) or nothing."""
        if isinstance(hints, HeaderHints):
            return hints
        return cls((hints,)) if hints else cls()


def decode_header_bytes(data: bytes, hints: HeaderHints | str | None = None) -> Decoded:
    """Decode raw 8-bit header bytes (a Subject, a display name, a file name).

    The one code path for every header: UTF-8 first (it almost never decodes
    anything else by accident), then each charset the message declares
    (strictly, through the superset table, so GBK is read as GB18030; 7-bit
    labels are skipped since 8-bit bytes prove them wrong), then detection
    over the message's whole raw header sample.  Only when nothing decodes
    cleanly is the reading with the fewest replacement characters taken --
    never U+FFFD where a better reading exists.
    """
    hints = HeaderHints.of(hints)
    if data.isascii():
        return Decoded(data.decode("ascii"), None, "us-ascii")
    tried: list[str] = []
    candidates: list[str] = ["utf-8"]
    for label in hints.declared:
        if label.strip().strip("\"'").lower() in _SEVEN_BIT:
            continue
        codec = normalize_label(label)
        if codec and codec not in candidates:
            candidates.append(codec)
    declared = hints.declared[0] if hints.declared else None
    for codec in candidates:
        tried.append(codec)
        try:
            return Decoded(data.decode(codec), declared, codec, guessed=codec != "utf-8")
        except (UnicodeDecodeError, LookupError):
            pass
    detected = _detect(hints.sample if data in hints.sample else data, MAIL_CODECS)
    if detected and detected not in tried:
        tried.append(detected)
        try:
            return Decoded(data.decode(detected), declared, detected, guessed=True)
        except (UnicodeDecodeError, LookupError):
            pass
    best = min([*tried, "gb18030"], key=lambda c: _replacements(data, c))
    return Decoded(data.decode(best, errors="replace"), declared, best, lossy=True)


def _replacements(data: bytes, codec: str) -> int:
    try:
        return data.decode(codec, errors="replace").count("\ufffd")
    except LookupError:
        return len(data)

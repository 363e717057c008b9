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


def _detect(data: bytes) -> str | None:
    """Ask charset-normalizer for the most plausible codec, if any."""
    best = charset_normalizer.from_bytes(data).best()
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

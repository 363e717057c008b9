"""The zh-CN catalog: every English reply text the core can produce has a translation."""

from __future__ import annotations

import re
from pathlib import Path

from mailbag.protocol.languages import _ZH_CN, choose, translate
from mailbag.protocol.pop3 import ABORT_TEXTS

PROTOCOL = Path(__file__).resolve().parents[2] / "src" / "mailbag" / "protocol"
#: The modules whose texts reach a POP3 client.
CORE = ("pop3.py", "pop3_commands.py", "snapshot.py", "sasl.py")


def test_choose_matches_ranges() -> None:
    assert choose("ZH-cn") == "zh-CN"
    assert choose("zh") == "zh-CN"
    assert choose("*") == "en"
    assert choose("z") is None


def test_translate_keeps_response_code_and_unknown_text() -> None:
    assert translate("[IN-USE] Mailbox is locked by another POP3 session.", "zh-CN") == (
        "[IN-USE] 邮箱正被另一个 POP3 会话使用。"
    )
    assert translate("Something new.", "zh-CN") == "Something new."
    assert translate("Line too long.", "en") == "Line too long."


def test_every_literal_reply_text_in_the_core_is_translated() -> None:
    # Literal texts given to Pop3Error/_ok/_err/_error in the core; a new English
    # text without a translation fails here rather than showing up English.
    source = "".join((PROTOCOL / name).read_text() for name in CORE)
    found = re.findall(
        r'(?:Pop3Error|\.ok|\.err|_error|Invalid)\(\s*"([^"{]+)"(?:\s*"([^"{]+)")?', source
    )
    texts = [first + second for first, second in found]
    texts += [*ABORT_TEXTS.values(), "; too many errors, closing connection."]
    assert len(texts) > 20
    patterns = [re.compile(p) for p, _ in _ZH_CN]
    missing = []
    for text in texts:
        body = re.sub(r"^\[[A-Z/-]+\] ", "", text)
        if not any(p.fullmatch(body) for p in patterns):
            missing.append(text)
    assert not missing

"""Response texts in other languages (RFC 6856 LANG): English and Simplified Chinese.

The state machine composes every reply text in English; when a client has
chosen another language with ``LANG``, ``translate`` rewrites the human part
of the first reply line through a small catalog of patterns.  Doing it at one
choke point keeps the state machine's code and its byte-string tests in one
language, and a text missing from the catalog simply stays English (RFC 6856
allows falling back).  Never translated: response codes in brackets (clients
parse them, RFC 2449 section 8), machine-readable replies such as STAT's
``+OK 3 600``, and multi-line bodies.

The seed document of this project is Chinese; its readers typed POP3 by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_LANGUAGE = "en"

#: Tag -> description shown by a bare ``LANG`` (in the language itself).
LANGUAGES: dict[str, str] = {"en": "English", "zh-CN": "简体中文"}

_RESPONSE_CODE = re.compile(r"^(\[[A-Z0-9/-]+\] ?)")

#: (English pattern, Chinese replacement), tried in order; whole-text matches only.
_ZH_CN: Sequence[tuple[str, str]] = (
    (r"Language changed to English\.", "语言已改为简体中文。"),
    (r"Logged in, (\d+) messages \((\d+) octets\)\.", r"登录成功，共 \1 封邮件（\2 字节）。"),
    (r"(\d+) messages \((\d+) octets\)\.", r"共 \1 封邮件（\2 字节）。"),
    (r"(\d+) messages \((\d+) octets\)", r"共 \1 封邮件（\2 字节）"),
    (r"(\d+) octets", r"\1 字节"),
    (r"Message (\d+) marked to be deleted\.", r"第 \1 封邮件已标记为删除。"),
    (r"Message (\d+) is deleted\.", r"第 \1 封邮件已被标记删除。"),
    (r"There's no message (\d+)\.", r"没有第 \1 封邮件。"),
    (r"Invalid message number: (.*)", r"无效的邮件编号：\1"),
    (r"Invalid number of lines: must be 0 or more\.", "无效的行数：必须是 0 或正整数。"),
    (r"Syntax: (.*)", r"语法：\1"),
    (r"Unknown command: (.*)", r"未知命令：\1"),
    (r"Unknown command\.", "未知命令。"),
    (r"(\w+) is not valid in the (\w+) state\.", r"\1 命令在 \2 状态下不可用。"),
    (r"Line too long\.", "命令行太长。"),
    (r"; too many errors, closing connection\.", "；错误太多，连接即将关闭。"),
    (r"Internal server error; closing connection\.", "服务器内部错误，连接即将关闭。"),
    (r"Server shutting down, try again later\.", "服务器正在关闭，请稍后再试。"),
    (r"No user name given; use USER first\.", "尚未提供用户名，请先使用 USER 命令。"),
    (r"Authentication failed\.", "认证失败。"),
    (
        r"Plaintext authentication disallowed on non-secure connections; "
        r"use STLS or the POP3S port\.",
        "不允许在未加密的连接上使用明文认证，请先使用 STLS 或改用 POP3S 端口。",
    ),
    (r"Authentication cancelled\.", "认证已取消。"),
    (r"Unsupported authentication mechanism\.", "不支持的认证机制。"),
    (r"Invalid base64 data in (initial|continued) response\.", "认证数据不是有效的 base64。"),
    (r"Invalid PLAIN authentication data\.", "无效的 PLAIN 认证数据。"),
    (r"Authentication line too long\.", "认证数据行太长。"),
    (r"Invalid characters in argument \(UTF-8 expected\)\.", "参数中有无效字符（应为 UTF-8）。"),
    (r"Control characters are not allowed in arguments\.", "参数中不允许出现控制字符。"),
    (r"TLS is already active\.", "TLS 已经启用。"),
    (r"STLS is not available on this server\.", "本服务器不提供 STLS。"),
    (r"Capability list follows\.", "以下是服务器能力列表。"),
    (r"Language listing follows\.", "以下是支持的语言。"),
    (r"Invalid language\.", "不支持该语言。"),
    (r"UTF8 enabled\.", "已启用 UTF8。"),
    (r"UTF8 is not available\.", "不提供 UTF8。"),
    (r"Begin TLS negotiation now\.", "现在开始 TLS 协商。"),
    (r"mailbag signing off\.", "mailbag 再见。"),
    (
        r"mailbag signing off \((\d+) deleted, maildrop empty\)\.",
        r"mailbag 再见（已删除 \1 封，邮箱已空）。",
    ),
    (
        r"mailbag signing off \((\d+) deleted, (\d+) left\)\.",
        r"mailbag 再见（已删除 \1 封，剩余 \2 封）。",
    ),
    (r"(\d+) messages could not be deleted\.", r"有 \1 封邮件未能删除。"),
    (r"Mailbox is locked by another POP3 session\.", "邮箱正被另一个 POP3 会话使用。"),
    (r"Mailbox unavailable, try again later\.", "邮箱暂时不可用，请稍后再试。"),
    (r"Message (\d+) cannot be read right now\.", r"第 \1 封邮件暂时无法读取。"),
    (r"Authentication is temporarily unavailable\.", "认证服务暂时不可用。"),
    (r"Autologout; idle for too long\.", "空闲时间过长，已自动退出。"),
    (r"Message follows\.", "邮件内容如下。"),
)

_CATALOGS: dict[str, list[tuple[re.Pattern[str], str]]] = {
    "zh-CN": [(re.compile(pattern), replacement) for pattern, replacement in _ZH_CN],
}


def choose(requested: str) -> str | None:
    """Match a LANG argument (a language range, RFC 4647 basic filtering) to a tag.

    ``*`` picks the default; ``zh`` matches ``zh-CN``; matching ignores case.
    """
    wanted = requested.strip().lower()
    if wanted == "*":
        return DEFAULT_LANGUAGE
    for tag in LANGUAGES:
        lowered = tag.lower()
        if lowered == wanted or lowered.startswith(wanted + "-"):
            return tag
    return None


def translate(text: str, language: str) -> str:
    """Return ``text`` in ``language``, keeping a leading response code untouched."""
    catalog = _CATALOGS.get(language)
    if not catalog or not text:
        return text
    code = ""
    match = _RESPONSE_CODE.match(text)
    if match:
        code, text = match.group(1), text[match.end() :]
    for pattern, replacement in catalog:
        if pattern.fullmatch(text):
            return code + pattern.sub(replacement, text)
    return code + text

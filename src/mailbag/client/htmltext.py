"""Readable plain text from an HTML-only mail body, with ``html.parser``.

Many Chinese webmail services and newsletters send HTML only.  A terminal
user needs the words, the paragraph breaks and the link targets, not a
layout engine, so this is a small event-driven converter on the standard
library's tolerant HTML tokenizer: block elements end lines, ``<br>`` breaks,
list items get a bullet, links keep their URL, ``<pre>`` keeps its spacing,
and script/style/head content is dropped.  Entities are resolved by the
parser (``convert_charrefs``).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK = {
    "address", "article", "aside", "blockquote", "center", "dd", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
    "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table",
    "tr", "ul",
}
_SKIP = {"script", "style", "head", "title", "template", "noscript"}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


class _TextExtractor(HTMLParser):
    """Collects text chunks; whitespace is collapsed except inside ``<pre>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._pre = 0
        self._href: list[str | None] = []
        self._link_text: list[int] = []

    def _newline(self, count: int = 1) -> None:
        self.parts.append("\n" * count)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += 1
        elif tag == "br":
            self._newline()
        elif tag in _BLOCK:
            self._newline(2 if tag in {"p", "h1", "h2", "h3", "table", "blockquote"} else 1)
            if tag == "li":
                self.parts.append("• ")
            elif tag == "pre":
                self._pre += 1
            elif tag == "hr":
                self.parts.append("―" * 20)
                self._newline()
        elif tag in {"td", "th"}:
            self.parts.append("\t")
        elif tag == "a":
            self._href.append(dict(attrs).get("href"))
            self._link_text.append(len(self.parts))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.parts.append(f"[{alt}]")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"br", "hr", "img"}:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK:
            if tag == "pre":
                self._pre = max(0, self._pre - 1)
            if tag == "li":
                return  # the next <li> or the list's end breaks the line
            self._newline(2 if tag in {"p", "h1", "h2", "h3", "table", "blockquote"} else 1)
        elif tag == "a" and self._href:
            href = self._href.pop()
            start = self._link_text.pop()
            text = "".join(self.parts[start:]).strip()
            if href and href.startswith(("http:", "https:", "mailto:")) and href != text:
                self.parts.append(f" <{href.removeprefix('mailto:')}>")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Convert an HTML document or fragment to wrapped-by-terminal plain text."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    lines = [line.rstrip() if "\t" in line else line.strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def meta_charset(html: bytes) -> str | None:
    """The charset an HTML part declares in ``<meta>``, when MIME says nothing."""
    match = _META_CHARSET.search(html[:4096])
    return match.group(1).decode("ascii") if match else None

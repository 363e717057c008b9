"""Re-flow ``text/plain; format=flowed`` bodies (RFC 3676) into paragraphs.

Mailers such as Thunderbird and Apple Mail wrap long lines at ~72 columns
and mark each soft break with a trailing space.  Shown as sent, a
paragraph is a ragged column that no longer fits a narrow terminal; joined
back, the terminal wraps it at its own width.  The rules (RFC 3676
section 4):

* a line ending in a space is *flowed*: it continues on the next line --
  unless that line has a different quote depth (4.5) or the line is the
  signature separator ``-- `` (4.3);
* ``>`` characters at the start give the quote depth (4.5); a space after
  them, or at the start of an unquoted line, is *space-stuffing* and is
  removed (4.4);
* with ``DelSp=yes`` the trailing space itself is deleted when joining
  (4.2, for languages written without spaces: Chinese and Japanese).

Quoted paragraphs come back with a ``> `` prefix per level.
"""

from __future__ import annotations


def _split_quote(line: str) -> tuple[int, str]:
    depth = len(line) - len(line.lstrip(">"))
    content = line[depth:]
    if content.startswith(" "):  # space-stuffing (4.4), also after the quote marks
        content = content[1:]
    return depth, content


def unflow(text: str, *, delsp: bool = False) -> str:
    """Join the soft-broken lines of a format=flowed body (lines end in ``\\n``)."""
    out: list[str] = []
    paragraph: list[str] = []
    para_depth = 0
    lines = text.split("\n")
    trailing_newline = text.endswith("\n")
    if trailing_newline:
        lines.pop()

    def emit(depth: int, content: str) -> None:
        out.append(("> " * depth if depth else "") + content)

    for line in lines:
        depth, content = _split_quote(line.rstrip("\r"))
        if paragraph and depth != para_depth:
            emit(para_depth, "".join(paragraph))  # quote depth changed: fixed (4.5)
            paragraph = []
        flowed = content.endswith(" ") and content != "-- "
        if flowed:
            paragraph.append(content[:-1] if delsp else content)
            para_depth = depth
            continue
        paragraph.append(content)
        emit(depth, "".join(paragraph))
        paragraph = []
    if paragraph:
        emit(para_depth, "".join(paragraph))
    return "\n".join(out) + ("\n" if trailing_newline else "")

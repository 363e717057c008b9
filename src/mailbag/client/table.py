"""Terminal and JSON views of a mailbox listing and of one message.

``rich`` measures cell widths (a CJK character takes two columns), so the
table lines up with Chinese subjects and shrinks gracefully on a narrow
terminal; it also honours ``NO_COLOR`` and drops styling when output is not
a terminal.  Every string we hand it is wrapped in ``Text`` so that square
brackets in a subject are never read as rich markup.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mailbag.client.headers import decode_addresses, parse_date, short_date
from mailbag.client.pop3 import POP3Client
from mailbag.client.render import (
    Rendered,
    has_attachments,
    header_hints,
    header_text,
    parse_bytes,
    raw_header,
)


@dataclass(frozen=True, slots=True)
class ListRow:
    """One message in ``list``: from LIST, UIDL and the headers of ``TOP n 0``."""

    msn: int
    size: int
    uid: str | None
    date: dt.datetime | None
    sender_name: str
    sender_addr: str
    subject: str
    attachments: bool

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form used by ``list --json``."""
        return {
            "msn": self.msn,
            "size": self.size,
            "uid": self.uid,
            "date": self.date.isoformat() if self.date else None,
            "from": {"name": self.sender_name, "address": self.sender_addr},
            "subject": self.subject,
            "attachments": self.attachments,
        }


def row_from_headers(msn: int, size: int, uid: str | None, headers: bytes) -> ListRow:
    """Build a row from the header block TOP returned."""
    msg = parse_bytes(headers)
    hint = header_hints(msg)
    sender = decode_addresses(raw_header(msg, "from") or "", hint)
    name, addr = sender[0] if sender else ("", "")
    return ListRow(
        msn=msn, size=size, uid=uid, date=parse_date(raw_header(msg, "date")),
        sender_name=name, sender_addr=addr, subject=header_text(msg, "subject", hint),
        attachments=has_attachments(msg),
    )


#: TOP commands in flight when the server allows PIPELINING (RFC 2449).
TOP_WINDOW = 32


def list_rows(client: POP3Client, limit: int | None = None) -> list[ListRow]:
    """LIST + UIDL + ``TOP n 0`` for each message (newest last, like the server).

    With PIPELINING the TOPs go out in groups, so a long listing costs a few
    round trips instead of one per message.
    """
    sizes = client.list()
    uids = client.uidl() or {}
    if limit is not None:
        sizes = sizes[-limit:] if limit > 0 else []
    window = TOP_WINDOW if client.pipelining else 1
    rows: list[ListRow] = []
    for start in range(0, len(sizes), window):
        group = sizes[start:start + window]
        client.send_pipelined(f"TOP {msn} 0" for msn, _size in group)
        for msn, size in group:
            chunks: list[bytes] = []
            client.next_reply(chunks.append)
            rows.append(row_from_headers(msn, size, uids.get(msn), b"".join(chunks)))
    return rows


def human_size(octets: int) -> str:
    """1536 -> '1.5K': short enough for a narrow column."""
    size = float(octets)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" or size >= 10 else f"{size:.1f}{unit}"
        size /= 1024
    return f"{octets}B"


def make_console(file: IO[str] | None = None) -> Console:
    """A console with our defaults: no auto-highlighting of numbers and URLs."""
    return Console(file=file, highlight=False)


def list_table(rows: list[ListRow], width: int = 80) -> Table:
    """The ``list`` table.

    rich shrinks columns proportionally and would squeeze the message number
    to nothing on a narrow terminal, so we choose what to show by width: the
    number, subject, size and marker always; the sender from 50 columns; the
    date from 64.  What is shown is truncated with an ellipsis, never wrapped.
    """
    show_from, show_date = width >= 50, width >= 64
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False, show_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    if show_date:
        table.add_column("Date", no_wrap=True, overflow="ellipsis", max_width=16)
    if show_from:
        table.add_column("From", no_wrap=True, overflow="ellipsis", max_width=24, ratio=1)
    table.add_column("Subject", no_wrap=True, overflow="ellipsis", ratio=3)
    table.add_column("Size", justify="right", no_wrap=True)
    table.add_column("A", no_wrap=True, header_style="", justify="center")
    for row in rows:
        cells: list[str | Text] = [str(row.msn)]
        if show_date:
            cells.append(short_date(row.date))
        if show_from:
            cells.append(Text(row.sender_name or row.sender_addr))
        cells += [Text(row.subject), human_size(row.size), "+" if row.attachments else ""]
        table.add_row(*cells)
    return table


def print_list(rows: list[ListRow], console: Console, total: tuple[int, int]) -> None:
    """Print the table and a one-line summary."""
    if rows:
        console.print(list_table(rows, console.width))
    count, octets = total
    console.print(Text(f"{count} message{'s' if count != 1 else ''}, {human_size(octets)}"
                       + ("  (A: + = has attachments)" if any(r.attachments for r in rows)
                          else "")))


def print_message(msg: Rendered, console: Console, msn: int | None = None) -> None:
    """Headers, the body and the attachment list, like a mail reader's view."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, value in (("From:", msg.sender), ("To:", msg.to), ("Cc:", msg.cc),
                         ("Date:", msg.date.strftime("%Y-%m-%d %H:%M %z") if msg.date else ""),
                         ("Subject:", msg.subject)):
        if value:
            grid.add_row(label, Text(value))
    console.print(grid)
    if msg.charset_note or msg.defects:
        notes = [n for n in (msg.charset_note,) if n]
        if msg.defects:
            notes.append("MIME defects: " + ", ".join(msg.defects))
        console.print(Text("(" + "; ".join(notes) + ")", style="dim"))
    console.rule(style="dim")
    if msg.notice:
        console.print(Text(f"({msg.notice})", style="dim"))
    else:
        console.print(Text(msg.body.rstrip("\n")))
    if msg.attachments:
        console.rule(style="dim")
        table = Table(box=None, pad_edge=False, show_header=False)
        table.add_column(justify="right")
        table.add_column(overflow="fold")
        table.add_column(no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        for att in msg.attachments:
            table.add_row(Text(f"[{att.index}]"), Text(att.filename), att.content_type,
                          human_size(att.size))
        console.print(Text(f"{len(msg.attachments)} attachment(s)"
                           + (f" - save with: mailbag mail save {msn}" if msn else "")))
        console.print(table)


def dump_json(data: Any, out: IO[str]) -> None:
    """Pretty JSON with real CJK characters (not ``\\uXXXX``) for scripts and humans."""
    json.dump(data, out, ensure_ascii=False, indent=2)
    out.write("\n")

"""``mailbag mail``: a terminal client for any POP3 server.

Sub-commands: list, read, save, delete, fetch, shell.  The account is a URL
(``-a pop3://user@host``, or ``$MAILBAG_ACCOUNT``); the password comes from
``$MAILBAG_PASSWORD``, ``~/.netrc`` or a prompt -- never from the command
line.  Message numbers are the server's for the current session (RFC 1939
"msn"); ``list`` shows them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from mailbag.client.account import ACCOUNT_ENV, PASSWORD_ENV, Account, parse_url, resolve_password
from mailbag.client.connection import open_session
from mailbag.client.fetch import default_state_path, fetch, open_store
from mailbag.client.localstore import Journal
from mailbag.client.pop3 import POP3Client
from mailbag.client.render import parse_file, render, safe_filename
from mailbag.client.sasl import MECHANISMS
from mailbag.client.shell import Shell
from mailbag.client.table import dump_json, list_rows, make_console, print_list, print_message
from mailbag.errors import ConfigError

#: RETR spools to memory up to this size, then to a temporary file.
SPOOL_IN_MEMORY = 8 * 1024 * 1024

EPILOG = f"""\
account: -a pop3://USER@HOST[:PORT] (STLS when offered) or pop3s://USER@HOST (TLS),
         or set ${ACCOUNT_ENV}.  Password: ${PASSWORD_ENV}, ~/.netrc, or a prompt.
examples:
  mailbag mail -a pop3s://me%40example.com@pop.example.com list
  mailbag mail read 3            mailbag mail save 3 --to ~/Downloads
  mailbag mail delete --uid 00000001a1b2c3d4   (UIDL from `list --json`)
  mailbag mail fetch --to ~/Maildir/ --delete
  mailbag mail shell
"""


LIST_JSON = """\
list --json prints one object (UTF-8, stable keys):
  {"count": int, "octets": int,              # STAT: messages and octets in the maildrop
   "messages": [{"msn": int,                 # message number, valid for this session only
                 "size": int,                # octets as the server counts them (LIST)
                 "uid": str | null,          # UIDL: stable across sessions (delete --uid)
                 "date": str | null,         # ISO 8601 with the sender's offset
                 "from": {"name": str, "address": str},
                 "subject": str,             # decoded
                 "attachments": bool}]}      # guessed from the headers (TOP n 0)
"""

READ_JSON = """\
read --json prints one object (UTF-8, stable keys):
  {"msn": int, "subject": str, "from": str, "to": str, "cc": str,   # decoded
   "date": str | null,            # ISO 8601
   "message_id": str,
   "body": str,                   # the text shown ("" when there is no text part)
   "body_type": str,              # "text/plain" or "text/html" (converted), "" if none
   "charset_note": str | null,    # e.g. "charset declared gb2312, detected gb18030"
   "notice": str | null,          # e.g. "no text part: ..." for attachment-only mail
   "attachments": [{"index": int,          # K for `save --part K`
                    "filename": str, "content_type": str,
                    "size": int}],         # decoded octets
   "defects": [str]}              # MIME defects the parser recorded
"""


def _msn(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a message number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("message numbers start at 1")
    return value


def _common(defaults: bool) -> argparse.ArgumentParser:
    """Connection options, accepted before or after the sub-command.

    The copy attached to each sub-command uses SUPPRESS defaults so that an
    option given before the sub-command is not overwritten by a default.
    """
    d: Any = (lambda v: v) if defaults else (lambda _v: argparse.SUPPRESS)
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("-a", "--account", metavar="URL", default=d(None),
                   help=f"pop3://user@host[:port] or pop3s://... (default: ${ACCOUNT_ENV})")
    g.add_argument("--ca", metavar="FILE", default=d(None),
                   help="trust this CA certificate (self-signed servers)")
    g.add_argument("--insecure", action="store_true", default=d(False),
                   help="do not verify the server certificate (testing only)")
    g.add_argument("--require-tls", action="store_true", default=d(False),
                   help="refuse to log in without TLS")
    g.add_argument("--timeout", type=float, metavar="SEC", default=d(60.0),
                   help="network timeout in seconds (default 60)")
    g.add_argument("--auth", choices=("auto", *MECHANISMS), default=d(None),
                   help="login method (default auto: the best the server offers, in the "
                        "order " + ", ".join(MECHANISMS) + ")")
    return p


def _account(args: argparse.Namespace) -> Account:
    url = args.account or os.environ.get(ACCOUNT_ENV)
    if not url:
        raise ConfigError(f"no account: use -a pop3://USER@HOST or set ${ACCOUNT_ENV}")
    account = parse_url(url)
    return account.with_mechanism(args.auth) if args.auth else account


def _session(args: argparse.Namespace) -> POP3Client:
    account = resolve_password(_account(args))
    return open_session(account, ca=args.ca, insecure=args.insecure,
                        require_tls=args.require_tls, timeout=args.timeout)


def _retr_spool(client: POP3Client, msn: int) -> tempfile.SpooledTemporaryFile[bytes]:
    # Returned open: the caller closes it with `with`.
    spool: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
        SPOOL_IN_MEMORY)
    client.retr(msn, spool.write)
    spool.seek(0)
    return spool


_TERMINAL_UNSAFE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xc2[\x80-\x9f]")


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _unsafe_for_terminal(spool: IO[bytes]) -> bool:
    """Whether raw bytes hold C0 controls (tab, CR, LF excepted), DEL or UTF-8 C1 controls."""
    tail = b""
    while chunk := spool.read(1 << 20):
        if _TERMINAL_UNSAFE.search(tail + chunk):
            spool.seek(0)
            return True
        tail = chunk[-1:]
    spool.seek(0)
    return False


def cmd_list(args: argparse.Namespace) -> int:
    """Table (or JSON) of the mailbox from LIST, UIDL and TOP n 0."""
    client = _session(args)
    try:
        total = client.stat()
        rows = list_rows(client, args.last)
    finally:
        client.quit()
    if args.json:
        dump_json({"count": total[0], "octets": total[1],
                   "messages": [r.to_json() for r in rows]}, sys.stdout)
    else:
        print_list(rows, make_console(), total)
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    """Show one message decoded, as JSON, or byte-exact with --raw."""
    client = _session(args)
    try:
        with _retr_spool(client, args.msn) as spool:
            if args.raw:
                if _stdout_is_terminal() and _unsafe_for_terminal(spool):
                    raise ConfigError(
                        f"message {args.msn} holds control characters or binary data that "
                        "could drive your terminal; `read --raw` writes it only to a file or "
                        f"a pipe (e.g. mailbag mail read {args.msn} --raw > message.eml)")
                sys.stdout.flush()
                shutil.copyfileobj(spool, sys.stdout.buffer)
                sys.stdout.buffer.flush()
                return 0
            msg = render(parse_file(spool))
    finally:
        client.quit()
    if args.json:
        data = msg.to_json()
        data["msn"] = args.msn
        dump_json(data, sys.stdout)
    else:
        print_message(msg, make_console(), args.msn)
    return 0


def _unique_path(directory: Path, name: str) -> Path:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, dot, ext = name, "", ""
    candidate, n = directory / name, 1
    while candidate.exists() or candidate.is_symlink():
        candidate = directory / f"{stem} ({n}){dot}{ext}"
        n += 1
    return candidate


def cmd_save(args: argparse.Namespace) -> int:
    """Write attachments under --to with sanitised, non-clobbering names."""
    client = _session(args)
    try:
        with _retr_spool(client, args.msn) as spool:
            msg = render(parse_file(spool))
    finally:
        client.quit()
    target = Path(args.to).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    chosen = [a for a in msg.attachments if not args.part or a.index in args.part]
    if not chosen:
        print(f"message {args.msn} has no attachments", file=sys.stderr)
        return 1
    for att in chosen:
        path = _unique_path(target, safe_filename(att.filename, f"attachment-{att.index}"))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(att.payload())
        print(path)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Mark the named messages, confirm, then QUIT (commit) or RSET (undo).

    ``--uid`` names messages by UIDL, which stays the same across sessions
    while message numbers shift whenever something is deleted or arrives.
    """
    if not args.msns and not args.uid:
        raise ConfigError("name the messages to delete: message numbers or --uid UIDL...")
    client = _session(args)
    try:
        rows = {r.msn: r for r in list_rows(client)}
        msns = list(dict.fromkeys(args.msns))
        if args.uid:
            by_uid = {r.uid: r.msn for r in rows.values() if r.uid is not None}
            if not by_uid and rows:
                raise ConfigError("the server has no UIDL: delete by message number")
            unknown = [u for u in args.uid if u not in by_uid]
            if unknown:
                raise ConfigError(f"no message with UIDL {', '.join(unknown)} on the server")
            msns += [by_uid[u] for u in args.uid if by_uid[u] not in msns]
        missing = [n for n in msns if n not in rows]
        if missing:
            raise ConfigError(f"no message {', '.join(map(str, missing))} on the server")
        args.msns = msns
        console = make_console()
        for msn in args.msns:
            client.dele(msn)
            row = rows[msn]
            console.print(f"marked {msn}: {row.sender_name or row.sender_addr} - {row.subject}",
                          markup=False)
        if not args.yes:
            if not sys.stdin.isatty():
                client.rset()
                raise ConfigError("refusing to delete without a terminal to confirm; use --yes")
            answer = input(f"Delete {len(args.msns)} message(s) on the server? [y/N] ")
            if answer.strip().lower() not in {"y", "yes"}:
                client.rset()
                console.print("undeleted (RSET); nothing was deleted")
                return 1
    except BaseException:
        client.close()  # no QUIT: the server discards every DELE mark
        raise
    client.quit()
    print(f"deleted {len(args.msns)} message(s)")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download new messages into a Maildir or mbox, tracking UIDLs."""
    account = resolve_password(_account(args))
    store = open_store(args.to, args.format)
    journal = Journal(Path(args.state) if args.state else default_state_path(store, account.label))
    try:
        client = open_session(account, ca=args.ca, insecure=args.insecure,
                              require_tls=args.require_tls, timeout=args.timeout)
        try:
            summary = fetch(client, store, journal, delete=args.delete, limit=args.limit,
                            progress=not args.quiet and sys.stderr.isatty())
        except BaseException:
            client.close()
            raise
    finally:
        store.close()
        journal.close()
    if args.json:
        dump_json({"fetched": summary.fetched, "octets": summary.octets,
                   "skipped": summary.skipped, "deleted": summary.deleted,
                   "seconds": round(summary.seconds, 3), "locations": summary.locations},
                  sys.stdout)
    elif not args.quiet:
        print(summary.line())
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    """Interactive POP3 session with the protocol shown."""
    account = _account(args)
    if not args.no_login:
        account = resolve_password(account)
    shell = Shell(account, make_console(), ca=args.ca, insecure=args.insecure,
                  login=not args.no_login)
    return shell.run()


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mail`` and its sub-commands to the top-level parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    mail = subparsers.add_parser(
        "mail", parents=[_common(True)], formatter_class=fmt, epilog=EPILOG,
        help="terminal mail client for any POP3 server (list, read, fetch...)",
        description="Read and fetch mail from any POP3 server; Chinese and MIME mail decoded.",
    )
    mail.set_defaults(handler=lambda _args: _usage(mail))
    sub = mail.add_subparsers(dest="mail_command", metavar="ACTION")
    common = _common(False)

    def add(name: str, help_text: str, handler: Any, extra: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                           formatter_class=fmt, epilog=(extra + "\n" if extra else "") + EPILOG)
        p.set_defaults(handler=handler)
        return p

    p = add("list", "list messages: number, date, sender, subject, size, attachments", cmd_list,
            LIST_JSON)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-n", "--last", type=int, metavar="N", help="only the last N messages")

    p = add("read", "show one message decoded (best text part, attachments listed)", cmd_read,
            READ_JSON)
    p.add_argument("msn", type=_msn, metavar="N", help="message number from `list`")
    p.add_argument("--raw", action="store_true", help="print the exact bytes the server sent")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("save", "save a message's attachments to a directory (safe names)", cmd_save)
    p.add_argument("msn", type=_msn, metavar="N", help="message number from `list`")
    p.add_argument("--to", default=".", metavar="DIR", help="target directory (default .)")
    p.add_argument("--part", type=int, action="append", metavar="K",
                   help="only attachment K (as numbered by `read`); repeatable")

    p = add("delete", "delete messages on the server (asks first; nothing else is touched)",
            cmd_delete)
    p.add_argument("msns", type=_msn, nargs="*", metavar="N", help="message numbers")
    p.add_argument("--uid", nargs="+", action="extend", metavar="UIDL",
                   help="messages by unique id (from `list --json`), safe when numbers shift")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    p = add("fetch", "download new messages into a Maildir or mbox (UIDL state, resumable)",
            cmd_fetch)
    p.add_argument("--to", required=True, metavar="PATH",
                   help="Maildir directory or mbox file")
    p.add_argument("--format", choices=("auto", "maildir", "mbox"), default="auto",
                   help="auto: existing directory or trailing / = Maildir, else mbox")
    p.add_argument("--delete", action="store_true",
                   help="delete from the server after the local copy is on disk")
    p.add_argument("--state", metavar="FILE", help="UIDL state file (default: beside PATH)")
    p.add_argument("--limit", type=int, metavar="N", help="fetch at most N messages")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="summary as JSON")

    p = add("shell", "interactive POP3 session: raw protocol shown, messages decoded",
            cmd_shell)
    p.add_argument("--no-login", action="store_true",
                   help="do not log in; type USER and PASS yourself")

"""Helper process for the concurrency and crash tests (not a test module).

``python deliver_worker.py ROOT_TEMPLATE USER COUNT SIZE TAG`` delivers COUNT
self-checking messages (forever when COUNT is 0), each about SIZE octets,
and prints each returned UIDL.  ``check_message`` verifies one.
"""

from __future__ import annotations

import asyncio
import sys

from mailbag.storage.maildir import MaildirStore


def make_message(tag: str, size: int) -> bytes:
    """A message that says how long its body is and ends with a marker line."""
    line = b"The quick brown fox jumps over the lazy dog 0123456789.\n"
    body = (line * (size // len(line) + 1))[:size]
    head = f"Subject: {tag}\nX-Body-Length: {len(body)}\n\n".encode()
    return head + body + f"\nEND {tag}\n".encode()


def check_message(data: bytes) -> str:
    """Return the tag of a complete message; raise AssertionError otherwise."""
    head, sep, rest = data.partition(b"\n\n")
    assert sep, "no header/body separator"
    fields = dict(line.split(b": ", 1) for line in head.split(b"\n"))
    tag = fields[b"Subject"].decode()
    length = int(fields[b"X-Body-Length"])
    assert rest == rest[:length] + f"\nEND {tag}\n".encode(), f"message {tag} is incomplete"
    assert len(rest) == length + len(f"\nEND {tag}\n"), f"message {tag} has the wrong length"
    return tag


def deliver_many(template: str, user: str, count: int, size: int, tag: str) -> list[str]:
    """Deliver ``count`` messages (forever if 0); return their UIDLs."""

    async def main() -> list[str]:
        store = MaildirStore(template)
        uids = []
        n = 0
        while count == 0 or n < count:
            n += 1
            uid = await store.deliver(user, make_message(f"{tag}-{n}", size))
            uids.append(uid)
            print(uid, flush=True)
        return uids

    return asyncio.run(main())


if __name__ == "__main__":
    template_arg, user_arg, count_arg, size_arg, tag_arg = sys.argv[1:6]
    deliver_many(template_arg, user_arg, int(count_arg), int(size_arg), tag_arg)

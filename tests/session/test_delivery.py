"""The shared delivery path and the LMTP session, over in-memory storage and streams.

``DeliveryAgent`` is what LMTP and ``mailbag deliver`` have in common:
quota checks, trace headers, and the mapping of storage failures to RFC 3463
codes.  The LMTP session tests run the real session loop over
``MemoryStream`` so error paths (internal errors, storage failures) are
reached without sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from mailbag.auth.users import UserRecord
from mailbag.errors import AuthError, MessageTooLarge, QuotaExceeded, StorageError
from mailbag.protocol.lmtp import LmtpPolicy
from mailbag.session.delivery import (
    DeliveryAgent,
    Envelope,
    Outcome,
    QuotaDefaults,
    line_ending,
    trace_headers,
)
from mailbag.session.lmtp import LmtpSession, LmtpSessionSettings
from mailbag.storage.base import Delivery
from mailbag.storage.memory import MemoryStore
from tests.session.memstream import MemoryStream

NOW = 1_700_000_000.0


@dataclass
class Users:
    """A users database of fixed records; ``broken`` simulates an unreadable file."""

    records: dict[str, UserRecord]
    broken: bool = False

    def lookup(self, login: str) -> UserRecord | None:
        if self.broken:
            raise AuthError("users file unreadable")
        return self.records.get(login)


def agent_with(*records: UserRecord, quota: QuotaDefaults | None = None,
               max_size: int = 0) -> tuple[DeliveryAgent, MemoryStore]:
    store = MemoryStore()
    users = Users({r.name: r for r in records})
    agent = DeliveryAgent(store, users, hostname="mx.test", max_message_size=max_size,
                          quota=quota, clock=lambda: NOW)
    return agent, store


BOB = UserRecord("bob", "{PLAIN}x")
LMTP_ENVELOPE = Envelope(sender="s@example.org", recipient="bob@example.org", protocol="LMTP",
                         helo="mta.test", peer="[127.0.0.1]", id="L1")


def deliver(agent: DeliveryAgent, record: UserRecord, message: bytes,
            envelope: Envelope = LMTP_ENVELOPE) -> Outcome:
    return asyncio.run(agent.deliver(record, message, envelope)).outcome


def test_deliver_adds_trace_headers_in_message_line_ending() -> None:
    """RFC 5321 section 4.4: Return-Path at final delivery; Received names the hop."""
    agent, store = agent_with(BOB)
    assert deliver(agent, BOB, b"Subject: s\r\n\r\nbody\r\n") is Outcome.DELIVERED
    [stored] = store.contents("bob").values()
    lines = stored.split(b"\r\n")
    assert lines[0] == b"Return-Path: <s@example.org>"
    assert lines[1] == b"Delivered-To: bob@example.org"
    assert lines[2] == b"Received: from mta.test ([127.0.0.1])"
    assert lines[3] == b"\tby mx.test (mailbag) with LMTP"
    assert lines[4] == b"\tid L1"
    assert lines[5].startswith(b"\tfor <bob@example.org>; ")
    assert stored.endswith(b"\r\nSubject: s\r\n\r\nbody\r\n")
    assert b"\n" not in stored.replace(b"\r\n", b"")  # no bare LF mixed in


def test_deliver_lf_message_gets_lf_headers() -> None:
    headers = trace_headers(Envelope(sender="", recipient="bob"), hostname="h", eol=b"\n", now=NOW)
    assert headers.startswith(b"Return-Path: <>\nDelivered-To: bob\n")
    assert b"\nReceived: by h (mailbag deliver)\n\tfor <bob>; " in headers
    assert b"\r" not in headers
    assert line_ending(b"a\nb\r\n") == b"\n" and line_ending(b"a\r\nb") == b"\r\n"


def test_deliver_without_envelope_stores_exact_bytes() -> None:
    """The LDA without -f/-a stores what it read (imports, Postfix-added headers)."""
    agent, store = agent_with(BOB)
    deliver(agent, BOB, b"X: y\n\nz\n", Envelope(received=False))
    assert list(store.contents("bob").values()) == [b"X: y\n\nz\n"]


def test_deliver_header_injection_is_neutralised() -> None:
    headers = trace_headers(Envelope(sender="a\r\nBcc: x", recipient="b"), hostname="h",
                            eol=b"\r\n", now=NOW)
    assert b"Bcc" not in headers.split(b"\r\n")[1]


def test_deliver_over_byte_quota_refused_whole() -> None:
    """RFC 3463 X.2.2 mailbox full: 552, and nothing stored (never truncated)."""
    user = UserRecord("bob", "{PLAIN}x", quota_bytes=600)
    agent, store = agent_with(user)
    assert deliver(agent, user, b"x" * 100 + b"\r\n") is Outcome.DELIVERED
    result = asyncio.run(agent.deliver(user, b"y" * 300 + b"\r\n", LMTP_ENVELOPE))
    assert result.outcome is Outcome.OVER_QUOTA
    assert (result.status.code, result.status.enhanced) == (552, "5.2.2")
    assert len(store.contents("bob")) == 1


def test_deliver_global_quota_applies_when_user_has_none() -> None:
    agent, _ = agent_with(BOB, quota=QuotaDefaults(messages=1))
    assert deliver(agent, BOB, b"a\r\n") is Outcome.DELIVERED
    assert deliver(agent, BOB, b"b\r\n") is Outcome.OVER_QUOTA


def test_deliver_user_quota_zero_overrides_global() -> None:
    user = UserRecord("bob", "{PLAIN}x", quota_messages=0)
    agent, _ = agent_with(user, quota=QuotaDefaults(messages=1))
    assert [deliver(agent, user, b"m\r\n") for _ in range(3)] == [Outcome.DELIVERED] * 3


def test_deliver_quota_tempfail_is_452_4_2_2_unless_bigger_than_quota() -> None:
    """Over quota may be temporary (the user can free space); bigger than the quota never is."""
    user = UserRecord("bob", "{PLAIN}x", quota_bytes=1000)
    agent, _ = agent_with(user, quota=QuotaDefaults(tempfail=True))
    deliver(agent, user, b"x" * 600 + b"\r\n")
    result = asyncio.run(agent.deliver(user, b"x" * 600 + b"\r\n", LMTP_ENVELOPE))
    assert (result.status.code, result.status.enhanced) == (452, "4.2.2")
    result = asyncio.run(agent.deliver(user, b"x" * 2000 + b"\r\n", LMTP_ENVELOPE))
    assert (result.status.code, result.status.enhanced) == (552, "5.2.2")


def test_deliver_parallel_to_one_user_cannot_overshoot_quota() -> None:
    """Deliveries to one user are serialised, so the check and the store are one step."""
    user = UserRecord("bob", "{PLAIN}x", quota_messages=5)
    agent, store = agent_with(user)

    async def many() -> list[Outcome]:
        results = await asyncio.gather(
            *(agent.deliver(user, b"m\r\n", LMTP_ENVELOPE) for _ in range(20))
        )
        return [r.outcome for r in results]

    outcomes = asyncio.run(many())
    assert outcomes.count(Outcome.DELIVERED) == 5
    assert len(store.contents("bob")) == 5


@pytest.mark.parametrize(
    ("error", "code", "enhanced", "outcome"),
    [
        (StorageError("disk"), 451, "4.3.0", Outcome.TEMPORARY),
        (QuotaExceeded("q"), 552, "5.2.2", Outcome.OVER_QUOTA),
        (MessageTooLarge("big"), 552, "5.3.4", Outcome.TOO_LARGE),
    ],
)
def test_deliver_storage_errors_map_to_rfc3463(
    error: StorageError, code: int, enhanced: str, outcome: Outcome
) -> None:
    agent, store = agent_with(BOB)
    store.fail_next("deliver", error)
    result = asyncio.run(agent.deliver(BOB, b"m\r\n", LMTP_ENVELOPE))
    assert (result.status.code, result.status.enhanced, result.outcome) == (code, enhanced, outcome)


def test_deliver_too_large_is_552_5_3_4() -> None:
    agent, store = agent_with(BOB, max_size=10)
    assert deliver(agent, BOB, b"x" * 11) is Outcome.TOO_LARGE
    assert store.contents("bob") == {}


# ------------------------------------------------------------ LMTP session


def run_session(agent: DeliveryAgent, script: bytes) -> bytes:
    async def main() -> bytes:
        stream = MemoryStream()
        session = LmtpSession(
            stream,
            settings=LmtpSessionSettings(LmtpPolicy(hostname="mx.test"), timeout=5),
            agent=agent,
            session_id="t1",
        )
        stream.client_sends(script)
        stream.client_closes()
        await session.run()
        return bytes(stream.output)

    return asyncio.run(main())


SCRIPT = (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<bob>\r\nRCPT TO:<alice>\r\nDATA\r\n"
          b"Subject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n")


def test_data_session_storage_failure_for_one_recipient_only() -> None:
    """RFC 2033 section 4.2: the failing recipient gets 451 4.3.0, the other 250."""
    alice = UserRecord("alice", "{PLAIN}x")
    agent, store = agent_with(BOB, alice)
    store.fail_next("deliver")
    out = run_session(agent, SCRIPT)
    tail = out.split(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")[1]
    codes = [line[:9] for line in tail.split(b"\r\n") if line]
    assert sorted(codes[:2]) == [b"250 2.0.0", b"451 4.3.0"]
    assert codes[2] == b"221 2.0.0"


def test_data_session_internal_error_is_451_for_everyone() -> None:
    """A bug in delivery becomes 451 4.3.0 (retry), never a traceback (DESIGN.md rule 9)."""
    alice = UserRecord("alice", "{PLAIN}x")
    agent, _ = agent_with(BOB, alice)

    async def boom(*args: object) -> None:
        raise RuntimeError("bug")

    agent.store.deliver = boom  # type: ignore[method-assign]
    out = run_session(agent, SCRIPT)
    assert out.count(b"451 4.3.0 Temporary failure, try again later\r\n") == 2
    assert b"RuntimeError" not in out and out.endswith(b"221 2.0.0 Bye\r\n")


def test_rcpt_session_unreadable_users_file_is_451() -> None:
    """An unreadable users file is not "no such user": 451 4.3.0, the MTA retries."""
    agent, _ = agent_with(BOB)
    agent.users.broken = True  # type: ignore[attr-defined]
    out = run_session(agent, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<bob>\r\nQUIT\r\n")
    assert b"451 4.3.0 Temporary lookup failure" in out and b"550" not in out


def test_deliver_reports_every_outcome_to_on_result() -> None:
    """The hook metrics use: one call per delivery, with its outcome."""
    seen: list[Outcome] = []
    user = UserRecord("bob", "{PLAIN}x", quota_messages=1)
    agent, _ = agent_with(user)
    agent.on_result = seen.append
    deliver(agent, user, b"one\r\n")
    deliver(agent, user, b"two\r\n")
    assert seen == [Outcome.DELIVERED, Outcome.OVER_QUOTA]


# ------------------------------------------------ one message, N recipients, one transaction


class OneTransactionStore(MemoryStore):
    """A MemoryStore that is a ``MultiDelivery``: records each ``deliver_many`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[Delivery]] = []
        self.fail: StorageError | None = None

    async def deliver_many(self, deliveries: Sequence[Delivery]) -> list[str | StorageError]:
        self.calls.append(list(deliveries))
        if self.fail is not None:
            raise self.fail
        return await deliver_many_one_by_one(self, deliveries)


async def deliver_many_one_by_one(
    store: MemoryStore, deliveries: Sequence[Delivery]
) -> list[str | StorageError]:
    results: list[str | StorageError] = []
    for d in deliveries:
        usage = await store.usage(d.user)
        if d.max_messages and usage.messages + 1 > d.max_messages:
            results.append(QuotaExceeded(d.user))
        else:
            results.append(await store.deliver(d.user, d.message))
    return results


def multi_agent(*records: UserRecord) -> tuple[DeliveryAgent, OneTransactionStore]:
    store = OneTransactionStore()
    agent = DeliveryAgent(store, Users({r.name: r for r in records}), hostname="mx.test",
                          clock=lambda: NOW)
    return agent, store


THREE = (b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<bob>\r\nRCPT TO:<carol>\r\nRCPT TO:<alice>\r\n"
         b"RCPT TO:<bob>\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n")


def data_replies(out: bytes) -> list[bytes]:
    tail = out.split(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")[1]
    return [line for line in tail.split(b"\r\n") if line][:-1]  # without QUIT's 221


def test_lmtp_all_recipients_in_one_transaction_one_reply_each_quota_per_recipient() -> None:
    """Issue 13 + RFC 2033 section 4.2: one deliver_many for every account of the DATA;
    one reply per RCPT, in RCPT order; a full mailbox refuses that recipient alone."""
    alice = UserRecord("alice", "{PLAIN}x")
    carol = UserRecord("carol", "{PLAIN}x", quota_messages=1)
    agent, store = multi_agent(BOB, alice, carol)
    asyncio.run(store.deliver("carol", b"already full\r\n"))
    replies = data_replies(run_session(agent, THREE))
    assert [r[:9] for r in replies] == [b"250 2.0.0", b"552 5.2.2", b"250 2.0.0", b"250 2.0.0"]
    assert b"<bob>" in replies[0] and b"<carol>" in replies[1] and b"<alice>" in replies[2]
    assert replies[3] == replies[0]  # bob named twice: delivered once, both RCPTs told so
    assert len(store.calls) == 1
    assert [d.user for d in store.calls[0]] == ["bob", "carol", "alice"]
    assert [d.max_messages for d in store.calls[0]] == [0, 1, 0]
    for d in store.calls[0]:  # each copy carries its own recipient's trace headers
        assert f"Delivered-To: {d.user}\r\n".encode() in d.message
    assert asyncio.run(store.usage("bob")).messages == 1


def test_lmtp_failed_transaction_is_451_for_every_recipient_and_stores_nothing() -> None:
    alice = UserRecord("alice", "{PLAIN}x")
    agent, store = multi_agent(BOB, alice)
    store.fail = StorageError("database: connection lost")
    replies = data_replies(run_session(agent, SCRIPT))
    assert [r[:9] for r in replies] == [b"451 4.3.0", b"451 4.3.0"]
    assert asyncio.run(store.usage("bob")).messages == 0


def test_lmtp_too_large_is_refused_per_recipient_before_the_transaction() -> None:
    agent, store = multi_agent(BOB, UserRecord("alice", "{PLAIN}x"))
    agent.max_message_size = 5
    replies = data_replies(run_session(agent, SCRIPT))
    assert [r[:9] for r in replies] == [b"552 5.3.4", b"552 5.3.4"]
    assert store.calls == []


def test_lmtp_on_postgres_is_one_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the shared store: a failure writing the second copy leaves none of them stored."""
    from mailbag.storage.postgres import PostgresStore
    from mailbag.storage.postgres import store as pg_store
    from tests.pgtest import fresh_database

    real_insert = pg_store.insert_message
    inserts: list[int] = []

    async def second_fails(*args: Any, **kwargs: Any) -> int:
        inserts.append(1)
        if len(inserts) == 2:
            raise OSError("connection reset")  # the driver's failure, mid-transaction
        return await real_insert(*args, **kwargs)

    alice, carol = UserRecord("alice", "{PLAIN}x"), UserRecord("carol", "{PLAIN}x",
                                                               quota_messages=1)
    with fresh_database() as dsn:
        store = PostgresStore(dsn, pool_min_size=0, pool_max_size=2)
        agent = DeliveryAgent(store, Users({r.name: r for r in (BOB, alice, carol)}),
                              hostname="mx.test", clock=lambda: NOW)
        asyncio.run(store.deliver("carol", b"already full\r\n"))
        monkeypatch.setattr(pg_store, "insert_message", second_fails)
        replies = data_replies(run_session(agent, THREE))
        assert [r[:9] for r in replies] == [b"451 4.3.0"] * 4
        assert [asyncio.run(store.usage(u)).messages for u in ("bob", "alice")] == [0, 0]
        monkeypatch.setattr(pg_store, "insert_message", real_insert)
        replies = data_replies(run_session(agent, THREE))
        assert [r[:9] for r in replies] == [b"250 2.0.0", b"552 5.2.2", b"250 2.0.0", b"250 2.0.0"]
        assert [asyncio.run(store.usage(u)).messages for u in ("bob", "alice", "carol")] == [
            1, 1, 1]

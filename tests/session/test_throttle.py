"""The guessing defence: growing delays per address and per account, never a lockout.

A fake clock makes every case exact and instant.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mailbag.auth.schemes import Argon2Params
from mailbag.auth.users import UsersFile
from mailbag.session import throttle as throttle_module
from mailbag.session.authenticate import Authenticator
from mailbag.session.throttle import FailureThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    base: float = 2.0, cap: float = 15.0, window: float = 900.0
) -> tuple[FailureThrottle, Clock]:
    clock = Clock()
    return FailureThrottle(base=base, cap=cap, window=window, clock=clock), clock


def test_pass_first_attempt_not_delayed() -> None:
    throttle, _ = make()
    assert throttle.delay_before_check("192.0.2.1", "demo") == 0.0


def test_pass_failures_double_the_delay_up_to_the_cap() -> None:
    throttle, _ = make(base=2.0, cap=15.0)
    delays = []
    for _ in range(6):
        throttle.record_failure("192.0.2.1", "demo")
        delays.append(throttle.delay_before_check("192.0.2.1", "demo"))
    assert delays == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_pass_per_address_counts_across_accounts() -> None:
    # One address guessing many accounts (password spraying) is slowed down too.
    throttle, _ = make()
    for n in range(4):
        throttle.record_failure("192.0.2.1", f"user{n}")
    assert throttle.delay_before_check("192.0.2.1", "someone-new") == 8.0
    assert throttle.delay_before_check("192.0.2.2", "someone-new") == 0.0


def test_pass_per_account_counts_across_addresses() -> None:
    # Many addresses guessing one account (a botnet) are slowed down on that account.
    throttle, _ = make()
    for n in range(3):
        throttle.record_failure(f"198.51.100.{n}", "Demo")
    assert throttle.delay_before_check("203.0.113.9", "demo") == 4.0  # case-insensitive


def test_pass_counters_forget_after_window() -> None:
    throttle, clock = make(window=900.0)
    throttle.record_failure("192.0.2.1", "demo")
    clock.now += 901
    assert throttle.delay_before_check("192.0.2.1", "demo") == 0.0
    assert throttle.record_failure("192.0.2.1", "demo") == 1  # counting restarts


def test_pass_success_clears_account_but_not_address() -> None:
    # The real user logging in ends the account's delay; the guessing address stays slow.
    throttle, _ = make()
    for _ in range(3):
        throttle.record_failure("192.0.2.1", "demo")
    throttle.record_success("192.0.2.1", "demo")
    assert throttle.delay_before_check("198.51.100.1", "demo") == 0.0
    assert throttle.delay_before_check("192.0.2.1", "other") == 4.0


def test_pass_legitimate_user_waits_at_most_the_cap() -> None:
    # No lockout: however many failures, the delay is bounded by max_failure_delay.
    throttle, _ = make(cap=15.0)
    for _ in range(1000):
        throttle.record_failure("192.0.2.1", "demo")
    assert throttle.delay_before_check("198.51.100.1", "demo") == 15.0


def test_pass_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle_module, "MAX_TRACKED", 10)
    throttle, _ = make()
    for n in range(50):
        throttle.record_failure(f"10.0.0.{n}", f"user{n}")
    assert throttle.delay_before_check("10.0.0.0", "user0") == 0.0  # oldest forgotten
    assert throttle.delay_before_check("10.0.0.49", "user49") == 1.0


def test_pass_delays_do_not_block_the_event_loop(tmp_path: Path) -> None:
    # Throttled checks sleep with asyncio: other work runs meanwhile.
    users = UsersFile(tmp_path / "users", argon2_params=Argon2Params(1, 1024, 1))
    users.add("demo", "demo")
    throttle = FailureThrottle(base=0.2, cap=0.4)
    auth = Authenticator(users, throttle)

    async def scenario() -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        await auth.check_password("demo", "wrong", "192.0.2.1")
        await auth.check_password("demo", "wrong", "192.0.2.1")
        elapsed = time.monotonic() - started
        task.cancel()
        return elapsed, ticks

    elapsed, ticks = asyncio.run(scenario())
    assert elapsed >= 0.2 + 0.1 + 0.2  # failure delay, growing pre-check delay, failure delay
    assert ticks >= 20


def test_auth_conclude_applies_the_same_throttle(tmp_path: Path) -> None:
    # SASL verdicts (SCRAM) pass through the throttle like USER/PASS.
    users = UsersFile(tmp_path / "users", argon2_params=Argon2Params(1, 1024, 1))
    throttle, _ = make(base=0.0, cap=0.0)
    auth = Authenticator(users, throttle)
    result = asyncio.run(auth.conclude("192.0.2.1", "demo", None, "wrong password"))
    assert result.user is None and result.reason == "wrong password"
    assert throttle.record_failure("192.0.2.1", "demo") == 2
    result = asyncio.run(auth.conclude("192.0.2.1", "demo", "demo", "ok"))
    assert result.user == "demo"
    assert throttle.delay_before_check("198.51.100.1", "demo") == 0.0

"""The guessing defence: growing delays for strangers, none for known-good networks.

The policy is pure (numbers in, seconds out); the throttle runs on a fake clock.
Every case is exact and instant.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mailbag.auth.schemes import Argon2Params
from mailbag.auth.users import UsersFile
from mailbag.session.authenticate import Authenticator
from mailbag.session.defence_state import MemoryFailureCounters
from mailbag.session.known_good import KnownNetworksFile
from mailbag.session.throttle import (
    DefenceState,
    DelayPolicy,
    FailureThrottle,
    address_key,
    source_network,
)

ALICE_HOME = "198.51.100.7"  # alice's usual network: 198.51.100.0/24
ATTACKER = "203.0.113.66"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make(
    base: float = 2.0, cap: float = 15.0, window: float = 900.0, **kwargs: object
) -> tuple[FailureThrottle, Clock]:
    clock = Clock()
    state = DefenceState(MemoryFailureCounters(clock=clock), KnownNetworksFile(None, clock=clock))
    throttle = FailureThrottle(
        base=base, cap=cap, window=window, state=state, clock=clock, **kwargs  # type: ignore[arg-type]
    )
    return throttle, clock


def delay(throttle: FailureThrottle, address: str, account: str, *, exists: bool = True) -> float:
    return asyncio.run(throttle.admit(address, account, may_be_known=exists)).delay


def fail(throttle: FailureThrottle, address: str, account: str, *, exists: bool = True) -> float:
    async def go() -> float:
        admission = await throttle.admit(address, account, may_be_known=exists)
        return await throttle.record_failure(admission)

    return asyncio.run(go())


def succeed(throttle: FailureThrottle, address: str, account: str) -> None:
    async def go() -> None:
        await throttle.record_success(await throttle.admit(address, account), account)

    asyncio.run(go())


# -- the pure policy ------------------------------------------------------------------


def test_policy_growing_delay_doubles_up_to_the_cap() -> None:
    policy = DelayPolicy(base=2.0, cap=15.0)
    assert [policy.growing(n) for n in range(7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert policy.growing(10_000) == 15.0  # no overflow, no lockout


def test_policy_before_check_is_the_worse_of_address_and_account() -> None:
    policy = DelayPolicy(base=2.0, cap=15.0)
    assert policy.before_check(address_failures=1, account_failures=4, known_good=False) == 8.0
    assert policy.before_check(address_failures=3, account_failures=0, known_good=False) == 4.0


def test_policy_known_good_source_never_waits_before_the_check() -> None:
    # NIST SP 800-63B 5.2.2: however many failures others caused, nothing before the check.
    policy = DelayPolicy(base=2.0, cap=15.0)
    assert policy.before_check(address_failures=99, account_failures=99, known_good=True) == 0.0


def test_policy_wrong_password_from_known_good_source_waits_after_the_check() -> None:
    # A wrong password pays the same growing delay, after the check instead of before.
    policy = DelayPolicy(base=2.0, cap=15.0)
    assert policy.after_failure(known_good=False, source_failures=5) == 2.0
    assert policy.after_failure(known_good=True, source_failures=0) == 2.0
    assert policy.after_failure(known_good=True, source_failures=3) == 2.0 + 4.0
    assert policy.after_failure(known_good=True, source_failures=50) == 2.0 + 15.0


def test_source_network_groups_ipv4_by_24_and_ipv6_by_64() -> None:
    assert source_network("192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert source_network("2001:db8:1:2:a:b:c:d", 24, 64) == "2001:db8:1:2::/64"
    assert source_network("::ffff:192.0.2.77", 24, 64) == "192.0.2.0/24"  # v4-mapped is v4
    assert source_network("fe80::1%eth0", 24, 64) == "fe80::/64"
    assert source_network("192.0.2.77", 32, 128) == "192.0.2.77/32"
    assert source_network("unix-socket", 24, 64) == "unix-socket"


def test_address_key_is_one_ipv4_address_or_one_ipv6_64() -> None:
    # An IPv6 host usually owns a /64: rotating addresses inside it gains nothing.
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1")
    assert address_key("192.0.2.1") != address_key("192.0.2.2")


# -- the throttle, as before for strangers --------------------------------------------


def test_pass_first_attempt_not_delayed() -> None:
    throttle, _ = make()
    assert delay(throttle, "192.0.2.1", "demo") == 0.0


def test_pass_failures_double_the_delay_up_to_the_cap() -> None:
    throttle, _ = make(base=2.0, cap=15.0)
    delays = []
    for _ in range(6):
        fail(throttle, "192.0.2.1", "demo")
        delays.append(delay(throttle, "192.0.2.1", "demo"))
    assert delays == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_pass_per_address_counts_across_accounts() -> None:
    # One address guessing many accounts (password spraying) is slowed down too.
    throttle, _ = make()
    for n in range(4):
        fail(throttle, "192.0.2.1", f"user{n}")
    assert delay(throttle, "192.0.2.1", "someone-new") == 8.0
    assert delay(throttle, "192.0.2.2", "someone-new") == 0.0


def test_pass_per_account_counts_across_addresses() -> None:
    # Many addresses guessing one account (a botnet) are slowed down on that account.
    throttle, _ = make()
    for n in range(3):
        fail(throttle, f"198.51.{n}.1", "Demo")
    assert delay(throttle, "203.0.113.9", "demo") == 4.0  # case-insensitive


def test_pass_counters_forget_after_window() -> None:
    throttle, clock = make(window=900.0)
    fail(throttle, "192.0.2.1", "demo")
    clock.now += 901
    assert delay(throttle, "192.0.2.1", "demo") == 0.0
    fail(throttle, "192.0.2.1", "demo")
    assert delay(throttle, "192.0.2.1", "demo") == 1.0  # counting restarted


def test_pass_legitimate_user_from_new_network_waits_at_most_the_cap() -> None:
    # No lockout: however many failures, the delay is bounded by max_failure_delay.
    throttle, _ = make(cap=15.0)
    for _ in range(1000):
        fail(throttle, ATTACKER, "demo")
    assert delay(throttle, "198.51.100.1", "demo") == 15.0


def test_pass_success_does_not_reset_an_attack_on_the_account() -> None:
    # The real user logging in must not hand a botnet fresh, undelayed guesses.
    throttle, _ = make()
    succeed(throttle, ALICE_HOME, "alice")
    for n in range(4):
        fail(throttle, f"203.0.{n}.1", "alice")
    succeed(throttle, ALICE_HOME, "alice")
    assert delay(throttle, "203.0.99.1", "alice") == 8.0


def test_pass_memory_is_bounded() -> None:
    clock = Clock()
    counters = MemoryFailureCounters(clock=clock, max_tracked=30)
    throttle = FailureThrottle(state=DefenceState(counters, KnownNetworksFile(None)), clock=clock)
    for n in range(50):
        fail(throttle, f"10.0.{n}.1", f"user{n}")
    assert len(counters) == 30
    assert delay(throttle, "10.0.0.1", "user0") == 0.0  # oldest forgotten
    assert delay(throttle, "10.0.49.1", "user49") == 1.0


# -- known-good networks ------------------------------------------------------------------


def test_known_good_network_skips_the_delay_an_attacker_caused() -> None:
    # Issue 11 (1a): 20 wrong passwords for alice from elsewhere ...
    throttle, _ = make()
    succeed(throttle, ALICE_HOME, "alice")
    for _ in range(20):
        fail(throttle, ATTACKER, "alice")
    assert delay(throttle, ATTACKER, "alice") == 15.0  # ... still slow the attacker,
    assert delay(throttle, "198.51.100.200", "alice") == 0.0  # never alice at home (same /24)
    assert delay(throttle, "192.0.2.1", "alice") == 15.0  # a fresh network still waits


def test_known_good_network_skips_the_delay_of_a_shared_nat_address() -> None:
    # Issue 11 (1b): one person's typos behind a NAT address do not slow colleagues who
    # logged in from there before; a first-time colleague waits as before.
    throttle, _ = make()
    office = "192.0.2.10"
    succeed(throttle, office, "bob")
    for _ in range(5):
        fail(throttle, office, "carol")
    assert delay(throttle, office, "bob") == 0.0
    assert delay(throttle, office, "dave") == 15.0


def test_known_good_is_per_account() -> None:
    throttle, _ = make()
    succeed(throttle, ALICE_HOME, "alice")
    for _ in range(3):
        fail(throttle, ALICE_HOME, "mallory-target")
    assert delay(throttle, ALICE_HOME, "mallory-target") == 4.0


def test_known_good_wrong_passwords_pay_after_the_check() -> None:
    # Guessing from inside a known-good network (the same office) is slowed as hard.
    throttle, _ = make(base=2.0, cap=15.0)
    succeed(throttle, ALICE_HOME, "alice")
    waits = [fail(throttle, ALICE_HOME, "alice") for _ in range(6)]
    assert waits == [2.0, 3.0, 4.0, 6.0, 10.0, 17.0]
    assert delay(throttle, ALICE_HOME, "alice") == 0.0  # the right password: still at once


def test_known_good_success_clears_its_own_failure_counter() -> None:
    throttle, _ = make()
    succeed(throttle, ALICE_HOME, "alice")
    for _ in range(3):
        fail(throttle, ALICE_HOME, "alice")  # typos
    succeed(throttle, ALICE_HOME, "alice")
    assert fail(throttle, ALICE_HOME, "alice") == 2.0


def test_known_good_expires_after_its_ttl() -> None:
    throttle, clock = make(known_good_ttl=3600.0)
    succeed(throttle, ALICE_HOME, "alice")
    for _ in range(5):
        fail(throttle, ATTACKER, "alice")
    clock.now += 3000
    assert delay(throttle, ALICE_HOME, "alice") == 0.0
    for _ in range(5):
        fail(throttle, ATTACKER, "alice")
    clock.now += 700
    assert delay(throttle, ALICE_HOME, "alice") == 15.0  # 3,700 s since the last success


def test_known_good_ttl_zero_turns_it_off() -> None:
    throttle, _ = make(known_good_ttl=0.0)
    succeed(throttle, ALICE_HOME, "alice")
    fail(throttle, ATTACKER, "alice")
    assert delay(throttle, ALICE_HOME, "alice") == 1.0


def test_known_good_prefix_is_configurable() -> None:
    throttle, _ = make(ipv4_prefix=32)
    succeed(throttle, "192.0.2.1", "alice")
    fail(throttle, ATTACKER, "alice")
    assert delay(throttle, "192.0.2.1", "alice") == 0.0
    assert delay(throttle, "192.0.2.2", "alice") == 1.0


def test_known_good_never_applies_to_an_unknown_account() -> None:
    # Even if the store has entries under that name (a deleted account), an unknown
    # login is treated like an account without known-good networks.
    throttle, _ = make()
    succeed(throttle, ALICE_HOME, "ghost")
    fail(throttle, ALICE_HOME, "ghost", exists=False)
    assert delay(throttle, ALICE_HOME, "ghost", exists=False) == 1.0


def test_unknown_and_known_accounts_get_identical_delays() -> None:
    # No enumeration: the same attack pattern gives the same delays for both.
    pattern = [f"203.0.{n % 7}.1" for n in range(12)]
    seen: dict[bool, list[tuple[float, float]]] = {}
    for exists in (True, False):
        throttle, _ = make()
        account = "alice" if exists else "nobody"
        if exists:
            succeed(throttle, ALICE_HOME, account)  # known-good elsewhere changes nothing here
        seen[exists] = [
            (delay(throttle, a, account, exists=exists), fail(throttle, a, account, exists=exists))
            for a in pattern
        ]
    assert seen[True] == seen[False]
    assert seen[True][0] == (0.0, 2.0) and seen[True][-1] == (15.0, 2.0)


# -- with the authenticator -----------------------------------------------------------------


@pytest.fixture
def users(tmp_path: Path) -> UsersFile:
    db = UsersFile(tmp_path / "users", argon2_params=Argon2Params(1, 1024, 1))
    db.add("demo", "demo")
    return db


def test_pass_delays_do_not_block_the_event_loop(users: UsersFile) -> None:
    # Throttled checks sleep with asyncio: other work runs meanwhile.
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


def test_auth_right_password_from_known_good_network_is_never_held_back(
    users: UsersFile,
) -> None:
    throttle = FailureThrottle(base=0.3, cap=5.0)
    auth = Authenticator(users, throttle)

    async def scenario() -> tuple[float, float]:
        assert (await auth.check_password("demo", "demo", "192.0.2.1")).user == "demo"
        for n in range(8):  # a botnet: every later stranger waits the 5 s cap
            await throttle.record_failure(await throttle.admit(f"203.0.{n}.1", "demo"))
        started = time.monotonic()
        assert (await auth.check_password("demo", "demo", "192.0.2.99")).user == "demo"
        home = time.monotonic() - started
        admission = await throttle.admit("198.51.100.1", "demo")
        return home, admission.delay

    home, stranger = asyncio.run(scenario())
    assert home < 0.25
    assert stranger == 5.0


def test_auth_conclude_applies_the_same_throttle(users: UsersFile) -> None:
    # SASL verdicts (SCRAM) pass through the throttle like USER/PASS.
    throttle, _ = make(base=0.0, cap=0.0)
    auth = Authenticator(users, throttle)
    result = asyncio.run(auth.conclude("192.0.2.1", "demo", None, "wrong password"))
    assert result.user is None and result.reason == "wrong password"
    counts = asyncio.run(throttle.state.counters.counts([address_key("192.0.2.1")], 900.0))
    assert counts == [1]
    result = asyncio.run(auth.conclude("192.0.2.1", "demo", "demo", "ok"))
    assert result.user == "demo"
    assert asyncio.run(throttle.state.known.is_known("demo", "192.0.2.0/24", 60.0))

"""Guessing defence: growing delays for strangers, none for an account's known-good networks.

Nothing is ever locked.  A failure makes the *next* attempts from that
address, or for that account, wait a little longer before they are checked
(doubling from ``base`` up to ``cap``); the counters forget after ``window``
seconds.  An attacker guessing from one address, or one account's password
from many, is slowed down exponentially, in parallel connections too.  The
delay comes *before* the check, for right and wrong passwords alike, so it
also hides the verdict: an attacker cannot cut a slow attempt short and
learn that it was wrong.

Known-good sources (NIST SP 800-63B 5.2.2): the networks an account logged
in from successfully (IPv4 /24, IPv6 /64 by default) within the last
``known_good_ttl`` seconds.  An attempt for that account from such a network
gets no delay before the check, whatever anybody else did: a stranger's
failures for the account, or a colleague's typos behind the same NAT address,
never hold back its right password.  An attacker cannot make the delay apply
there, because what is checked is where the *attempt* comes from, and
entries are made only by successful logins.  Wrong passwords from a
known-good network still pay: the growing delay, counted per account and
network, comes after the check instead of before it, so guessing from inside
such a network (the same office) is slowed as hard as from outside, while
the right password is answered at once.

Every failure counts on all three counters (address, account, account and
network); only how the delay is applied differs.  A success clears the
counter of its account and network only: the per-account counter keeps
counting a botnet's guesses until the window passes, so the real user
logging in does not reset an attack's delay.

``DelayPolicy`` is the pure part (numbers in, seconds out); ``FailureThrottle``
binds it to the state stores of ``session.defence_state``.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailbag.session.defence_state import FailureCounters, KnownNetworks, MemoryFailureCounters
from mailbag.session.known_good import KnownNetworksFile

#: NIST SP 800-63B leaves the period open; a month covers holidays and travel.
DEFAULT_KNOWN_GOOD_TTL = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class DelayPolicy:
    """What delay for what: pure, so every case is a unit test without a clock or sleep."""

    #: Seconds before any failure is answered, and the unit of the growing delay.
    base: float = 2.0
    #: Upper bound of the growing delay.
    cap: float = 15.0

    def growing(self, failures: int) -> float:
        """The delay earned by ``failures`` recent failures: 0, base/2, base, 2*base, ... cap."""
        if failures <= 0:
            return 0.0
        return min(self.cap, self.base * float(2 ** min(failures - 1, 16)) / 2)

    def before_check(
        self, *, address_failures: int, account_failures: int, known_good: bool
    ) -> float:
        """Seconds to wait before checking credentials (right or wrong, the same)."""
        if known_good:
            return 0.0
        return self.growing(max(address_failures, account_failures))

    def after_failure(self, *, known_good: bool, source_failures: int) -> float:
        """Seconds before a failure is answered (the same for unknown users).

        From a known-good network the growing delay of that account and network
        is added here: a wrong password from there waits as long as it would have
        anywhere, only a right one is spared.
        """
        return self.base + (self.growing(source_failures) if known_good else 0.0)


def source_network(address: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The network ``address`` belongs to, e.g. ``192.0.2.0/24``; non-IP peers are themselves."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def address_key(address: str) -> str:
    """Per-address counters count an IPv4 address, or an IPv6 /64 (one host's usual share)."""
    return "addr:" + source_network(address, 32, 64)


@dataclass(slots=True)
class DefenceState:
    """The state behind the policy; outlives a SIGHUP (new policy, same counters)."""

    counters: FailureCounters
    known: KnownNetworks

    @classmethod
    def in_memory(cls, clock: Callable[[], float] = time.monotonic) -> DefenceState:
        """Nothing persisted (tests, and a config with ``known_good_file = ""``)."""
        return cls(MemoryFailureCounters(clock=clock), KnownNetworksFile(None))

    async def close(self) -> None:
        """Persist pending state (at shutdown)."""
        await self.known.close()


@dataclass(frozen=True, slots=True)
class Admission:
    """One login attempt as the throttle saw it before the check."""

    account: str
    network: str
    known_good: bool
    #: Seconds the attempt waits before its check.
    delay: float
    #: Earlier failures of this account from this network (the known-good delay).
    source_failures: int
    keys: tuple[str, str, str]


class FailureThrottle:
    """Applies ``DelayPolicy`` to one ``DefenceState``."""

    def __init__(
        self,
        *,
        base: float = 2.0,
        cap: float = 15.0,
        window: float = 900.0,
        known_good_ttl: float = DEFAULT_KNOWN_GOOD_TTL,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
        state: DefenceState | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = DelayPolicy(base, cap)
        self.window = window
        self.known_good_ttl = known_good_ttl
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.state = state if state is not None else DefenceState.in_memory(clock)

    @property
    def base(self) -> float:
        """Seconds before a failure is answered."""
        return self.policy.base

    @base.setter
    def base(self, value: float) -> None:
        self.policy = DelayPolicy(value, self.policy.cap)

    @property
    def cap(self) -> float:
        """Upper bound of the growing delay."""
        return self.policy.cap

    def network_of(self, address: str) -> str:
        """The known-good network an address belongs to."""
        return source_network(address, self.ipv4_prefix, self.ipv6_prefix)

    async def admit(self, address: str, account: str, *, may_be_known: bool = True) -> Admission:
        """Look up the counters and known-good status of one attempt; its delay.

        ``may_be_known`` is False for a login that names no account: it is treated
        as an account without known-good networks, whatever the store holds.
        """
        network = self.network_of(address)
        keys = (address_key(address), f"acct:{account.lower()}", f"pair:{account}|{network}")
        # Asked either way, so a store a round trip away costs unknown logins the same.
        known = await self.state.known.is_known(account, network, self.known_good_ttl)
        known = known and may_be_known
        by_address, by_account, by_source = await self.state.counters.counts(keys, self.window)
        delay = self.policy.before_check(
            address_failures=by_address, account_failures=by_account, known_good=known
        )
        return Admission(account, network, known, delay, by_source, keys)

    async def record_failure(self, admission: Admission) -> float:
        """Count a failure everywhere; seconds to wait before answering it."""
        await self.state.counters.add(admission.keys, self.window)
        return self.policy.after_failure(
            known_good=admission.known_good, source_failures=admission.source_failures
        )

    async def record_success(self, admission: Admission, account: str) -> None:
        """``account`` (canonical) logged in: its network becomes (stays) known-good."""
        await self.state.counters.reset(admission.keys[2])
        network = admission.network
        if account != admission.account:
            await self.state.counters.reset(f"pair:{account}|{network}")
        await self.state.known.remember(account, network, self.known_good_ttl)

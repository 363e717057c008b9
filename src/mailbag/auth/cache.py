"""The authentication cache: a right password seen recently skips the slow hash.

Mail clients poll every few minutes with the same password, and each login
would otherwise pay a full Argon2id verification (~100 ms of CPU and 64 MiB
at the default cost).  After a *successful* verification we remember, per
account, a keyed hash of ``(account, stored hash, password)`` for ``ttl``
seconds; the next login with the same password against the same stored hash
is then accepted by one keyed BLAKE2b and a constant-time compare.

Why this is safe:

- The password is never stored: only a 32-octet keyed hash, under a random key
  made at start-up that never leaves this process (or, with worker processes,
  the supervisor and its workers: ``server.replicated_defence``; a memory dump that yields
  both the key and the entries allows fast offline guessing of the cached
  passwords only; that is the trade-off, bounded by ``ttl`` and ``max_entries``).
- The stored hash is part of what is hashed, so a changed password (``mailbag
  user passwd``, a hand-edited users file, a database update) makes the old
  entry useless at the very next login, without any invalidation message:
  the cache only memoizes the pure function ``verify(password, stored)``.
- Failures are never cached and never evict an entry, so a wrong guess costs
  the attacker a full verification and cannot push the real user out.
- Bounded: least recently used entries go first beyond ``max_entries``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

#: Default number of accounts remembered (~150 bytes each).
DEFAULT_MAX_ENTRIES = 100_000


class VerificationCache:
    """Remembers recent successful password verifications as keyed hashes."""

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        key: bytes | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        #: Random per process unless given (worker processes share their supervisor's).
        self._key = key if key is not None else secrets.token_bytes(32)
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        #: Lookups answered from the cache / that needed the real verification.
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """False when ``ttl`` or ``max_entries`` is 0: every login verifies the hash."""
        return self.ttl > 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"VerificationCache(ttl={self.ttl}, entries={len(self._entries)})"

    def digest(self, account: str, stored: str, password: str) -> bytes:
        """The keyed hash an entry holds (what a worker hands its peers, never the password)."""
        mac = hashlib.blake2b(key=self._key, digest_size=32, person=b"mailbag-authc")
        for part in (account, stored, password):
            data = part.encode("utf-8", "surrogatepass")
            mac.update(len(data).to_bytes(4, "big"))  # unambiguous: no two triples collide
            mac.update(data)
        return mac.digest()

    def check(self, account: str, stored: str, password: str) -> bool:
        """True if ``password`` verified against ``stored`` for ``account`` within ``ttl``."""
        if not self.enabled:
            return False
        entry = self._entries.get(account)
        now = self._clock()
        if entry is not None and entry[1] <= now:
            del self._entries[account]
            entry = None
        expected = entry[0] if entry is not None else bytes(32)
        # Always compute and compare, so a hit and a miss cost the same until the end.
        matched = hmac.compare_digest(self.digest(account, stored, password), expected)
        if matched and entry is not None:
            self._entries.move_to_end(account)
            self.hits += 1
            return True
        self.misses += 1
        return False

    def remember(self, account: str, stored: str, password: str) -> None:
        """Record a successful verification (never call this for a failure)."""
        if self.enabled:
            self.install(account, self.digest(account, stored, password), self.ttl)

    def install(self, account: str, digest: bytes, ttl: float) -> None:
        """Record a verification whose keyed hash is known (another worker's, same key).

        Kept for ``ttl`` seconds at most, never longer than this cache's own ``ttl``.
        """
        if not self.enabled or ttl <= 0 or len(digest) != 32:
            return
        self._entries[account] = (digest, self._clock() + min(ttl, self.ttl))
        self._entries.move_to_end(account)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, account: str) -> None:
        """Drop one account's entry."""
        self._entries.pop(account, None)

    def clear(self) -> None:
        """Drop everything (SIGHUP)."""
        self._entries.clear()

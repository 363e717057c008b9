"""The authentication cache: memoizes verify(password, stored hash), never a password."""

from __future__ import annotations

import pickle

from mailbag.auth.cache import VerificationCache

STORED = "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_cache_hit_after_remember_within_ttl() -> None:
    clock = Clock()
    cache = VerificationCache(300.0, clock=clock)
    assert not cache.check("alice", STORED, "s3cret")
    cache.remember("alice", STORED, "s3cret")
    assert cache.check("alice", STORED, "s3cret")
    clock.now += 299
    assert cache.check("alice", STORED, "s3cret")
    assert (cache.hits, cache.misses) == (2, 1)


def test_cache_entry_expires_after_ttl() -> None:
    clock = Clock()
    cache = VerificationCache(300.0, clock=clock)
    cache.remember("alice", STORED, "s3cret")
    clock.now += 300
    assert not cache.check("alice", STORED, "s3cret")
    assert len(cache) == 0


def test_cache_wrong_password_misses_and_does_not_evict() -> None:
    # A guess costs the attacker a real verification and cannot push the user out.
    cache = VerificationCache(300.0)
    cache.remember("alice", STORED, "s3cret")
    assert not cache.check("alice", STORED, "guess")
    assert cache.check("alice", STORED, "s3cret")


def test_cache_changed_stored_hash_misses() -> None:
    # `mailbag user passwd` (or an edited users file) changes the stored hash: the old
    # entry cannot answer for it, with no invalidation message needed.
    cache = VerificationCache(300.0)
    cache.remember("alice", STORED, "s3cret")
    assert not cache.check("alice", STORED.replace("aGFzaGhhc2g", "bmV3aGFzaA"), "s3cret")


def test_cache_is_per_account() -> None:
    cache = VerificationCache(300.0)
    cache.remember("alice", STORED, "shared")
    assert not cache.check("bob", STORED, "shared")


def test_cache_never_holds_the_password() -> None:
    cache = VerificationCache(300.0)
    password = "very-distinctive-password-4711"
    cache.remember("alice", STORED, password)
    assert password not in repr(cache)
    assert password.encode() not in pickle.dumps(dict(cache._entries))


def test_cache_keys_differ_per_process() -> None:
    # A per-process random key: entries from one process say nothing in another.
    one, two = VerificationCache(300.0), VerificationCache(300.0)
    assert one.digest("alice", STORED, "pw") != two.digest("alice", STORED, "pw")


def test_cache_with_a_given_key_accepts_an_installed_entry_for_at_most_its_ttl() -> None:
    # Worker processes share their supervisor's key: one's entry is valid in another.
    clock = Clock()
    key = bytes(range(32))
    one = VerificationCache(300.0, key=key)
    two = VerificationCache(300.0, key=key, clock=clock)
    two.install("alice", one.digest("alice", STORED, "pw"), 1000.0)
    assert two.check("alice", STORED, "pw")
    assert not two.check("alice", STORED, "guess")
    clock.now += 300  # capped at this cache's own ttl
    assert not two.check("alice", STORED, "pw")
    two.install("alice", one.digest("alice", STORED, "pw"), 0.0)  # already expired: ignored
    two.install("bob", b"short", 10.0)  # malformed: ignored
    assert len(two) == 0


def test_cache_fields_cannot_be_shifted_into_each_other() -> None:
    cache = VerificationCache(300.0)
    assert cache.digest("ab", "c", "d") != cache.digest("a", "bc", "d")


def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = VerificationCache(300.0, max_entries=3)
    for name in ("a", "b", "c"):
        cache.remember(name, STORED, "pw")
    assert cache.check("a", STORED, "pw")  # "a" is now the most recent
    cache.remember("d", STORED, "pw")
    assert len(cache) == 3
    assert not cache.check("b", STORED, "pw")
    assert cache.check("a", STORED, "pw") and cache.check("d", STORED, "pw")


def test_cache_ttl_zero_disables_it() -> None:
    cache = VerificationCache(0.0)
    cache.remember("alice", STORED, "pw")
    assert not cache.enabled and not cache.check("alice", STORED, "pw")
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)


def test_cache_forget_and_clear() -> None:
    cache = VerificationCache(300.0)
    cache.remember("alice", STORED, "pw")
    cache.remember("bob", STORED, "pw")
    cache.forget("alice")
    assert not cache.check("alice", STORED, "pw") and cache.check("bob", STORED, "pw")
    cache.clear()
    assert len(cache) == 0

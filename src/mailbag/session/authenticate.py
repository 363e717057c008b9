"""Checking credentials without leaking which part was wrong.

An unknown user and a wrong password must look identical to the client: the
same reply, the same delay, and the same CPU work (a dummy hash verification),
so user names cannot be enumerated by timing.  Hash verification runs in a
thread pool: Argon2 takes tens of milliseconds of CPU and must never block the
event loop that serves every other session.

Order of one attempt: the throttle's delay (none from a known-good network of
the account, see ``session.throttle``), then the check (the authentication
cache first, ``auth.cache``, then the real hash), then either the success at
once or the failure after its delay.  A right password is therefore never
held back longer than a wrong one would have been.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from mailbag.auth.cache import VerificationCache
from mailbag.auth.schemes import is_fast_scheme, verify_dummy, verify_password
from mailbag.auth.scram import ScramSecrets
from mailbag.auth.users import UserDatabase, UserRecord, lookup_user
from mailbag.errors import AuthError, InvalidUsername
from mailbag.logs import log_event
from mailbag.session.throttle import Admission, FailureThrottle

T = TypeVar("T")


@functools.cache
def hash_pool() -> ThreadPoolExecutor:
    """The threads that verify password hashes: one per CPU, shared by all sessions.

    Not the loop's default executor, which also opens maildrops: queued
    behind 50 Argon2 verifications (a login burst), an open would wait for
    all of them.  More hash threads than CPUs add no throughput, only
    memory (64 MiB each at default Argon2 cost) and latency.
    """
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="mailbag-hash")


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Outcome of one login attempt; ``user`` is the canonical account name on success."""

    user: str | None
    reason: str


@runtime_checkable
class AuthObserver(Protocol):
    """Counts authentication-cache lookups (``server.metrics.Metrics`` implements it)."""

    def auth_cache(self, result: str) -> None:
        """One lookup: ``hit`` or ``miss``."""


class Authenticator:
    """Verifies passwords and APOP digests with throttling and constant-time checks."""

    def __init__(
        self,
        users: UserDatabase,
        throttle: FailureThrottle,
        *,
        executor: ThreadPoolExecutor | None = None,
        cache: VerificationCache | None = None,
        observer: AuthObserver | None = None,
    ) -> None:
        self.users = users
        self.throttle = throttle
        self._executor = executor if executor is not None else hash_pool()
        #: Off unless given: every verification then pays the hash.
        self.cache = cache if cache is not None else VerificationCache(0)
        self._observer = observer

    def _lookup(self, login: str) -> UserRecord | None:
        try:
            return self.users.lookup(login)
        except InvalidUsername:
            return None

    async def _lookup_async(self, login: str) -> UserRecord | None:
        """``_lookup`` that never blocks the loop on a database-backed user store."""
        try:
            return await lookup_user(self.users, login)
        except InvalidUsername:
            return None

    async def _run(self, func: object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)  # type: ignore[arg-type]

    async def check_password(self, login: str, password: str, address: str) -> AuthResult:
        """USER/PASS and SASL PLAIN: every check of a plaintext password comes here."""
        admission, found = await self._admit_found(address, login)
        # The account looked up for the throttle is the one checked (one query on a
        # database users backend, not two); if that lookup failed, ask again so
        # the error is reported here, after the delay.
        record = found[0] if found else await self._lookup_async(login)
        if record is None:
            await self._run(verify_dummy, password)
            return await self._failed(admission, "unknown user")
        good = self._cached(record, password)
        if not good:
            try:
                if is_fast_scheme(record.password):  # microseconds: not worth a thread hand-off
                    good = verify_password(password, record.password)
                else:
                    good = bool(await self._run(verify_password, password, record.password))
            except AuthError as exc:
                log_event("auth-error", user=record.name, error=str(exc))
                return await self._failed(admission, "unusable password hash")
            if good:
                self.cache.remember(record.name, record.password, password)
        if not good:
            return await self._failed(admission, "wrong password")
        await self.throttle.record_success(admission, record.name)
        return AuthResult(record.name, "ok")

    def _cached(self, record: UserRecord, password: str) -> bool:
        if not self.cache.enabled:
            return False
        hit = self.cache.check(record.name, record.password, password)
        if self._observer is not None:
            self._observer.auth_cache("hit" if hit else "miss")
        return hit

    async def check_apop(
        self, login: str, timestamp: str, digest: str, address: str
    ) -> AuthResult:
        """APOP (RFC 1939 section 7): MD5 over timestamp and a retrievable secret.

        Only users with an ``apop`` secret can use it; for everyone else APOP
        fails exactly like a wrong password.
        """
        admission = await self._admit(address, login)
        record = await self._lookup_async(login)
        secret = record.apop_secret if record is not None else None
        expected = hashlib.md5(
            (timestamp + (secret or "\x00no-secret")).encode(), usedforsecurity=False
        ).hexdigest()
        if record is None or secret is None or not hmac.compare_digest(expected, digest):
            reason = "unknown user" if record is None else "wrong digest"
            if record is not None and secret is None:
                reason = "no APOP secret"
            return await self._failed(admission, reason)
        await self.throttle.record_success(admission, record.name)
        return AuthResult(record.name, "ok")

    async def sasl_step(self, step: Callable[[], T]) -> T:
        """Run one SASL mechanism step, which may look a user up synchronously.

        SCRAM's mechanism is sans-IO and calls ``scram_credentials`` from
        inside ``step``.  With the users file that is a dictionary lookup, run
        in place; with a store that answers over the network (one that offers
        ``lookup_async``, e.g. PostgreSQL) the step runs in a worker thread,
        so one slow query never stalls every other session on the loop.
        """
        if getattr(self.users, "lookup_async", None) is None:
            return step()
        return await asyncio.to_thread(step)

    def scram_credentials(self, login: str) -> tuple[str, ScramSecrets | None] | None:
        """SCRAM-SHA-256 keys for ``login`` (``session.sasl.ScramLookup``); None: no such user.

        Raises ``AuthError`` when the users database cannot be read.
        """
        record = self._lookup(login)
        return None if record is None else (record.name, record.scram)

    async def conclude(
        self, address: str, login: str, user: str | None, reason: str
    ) -> AuthResult:
        """Throttle and count a verdict reached elsewhere (a SASL mechanism such as SCRAM).

        The verdict is held back by the same growing delay as a password check, so SCRAM
        guesses are throttled exactly like USER/PASS guesses.
        """
        admission = await self._admit(address, login)
        if user is None:
            return await self._failed(admission, reason)
        await self.throttle.record_success(admission, user)
        return AuthResult(user, "ok")

    async def _account(self, login: str) -> tuple[str, bool]:
        """The account an attempt is about, and whether it exists.

        Canonical for a known user, so ``alice`` and ``alice@default.domain`` share
        their counters and known-good networks.  An unknown login is its own key
        and never has known-good networks (not even those of a deleted account of
        that name), exactly like a known account that has none, so the delays do
        not tell the two apart.
        """
        account, exists, _ = await self._account_found(login)
        return account, exists

    async def _account_found(
        self, login: str
    ) -> tuple[str, bool, tuple[UserRecord | None] | tuple[()]]:
        """``_account`` plus the record looked up: ``(record,)``, or ``()`` if that failed."""
        try:
            record = await self._lookup_async(login)
        except AuthError:  # reported by the check itself, after the delay
            return login, False, ()
        return (record.name if record is not None else login, record is not None, (record,))

    async def _admit(self, address: str, login: str) -> Admission:
        admission, _ = await self._admit_found(address, login)
        return admission

    async def _admit_found(
        self, address: str, login: str
    ) -> tuple[Admission, tuple[UserRecord | None] | tuple[()]]:
        account, exists, found = await self._account_found(login)
        admission = await self.throttle.admit(address, account, may_be_known=exists)
        if admission.delay > 0:
            # Logged so an administrator can see guessing being slowed down (never the secret).
            log_event("throttled", peer=address, user=login, delay=round(admission.delay, 3))
            await asyncio.sleep(admission.delay)
            found = ()  # the account may have changed while we waited: look it up again
        return admission, found

    async def _failed(self, admission: Admission, reason: str) -> AuthResult:
        delay = await self.throttle.record_failure(admission)
        await asyncio.sleep(delay)
        return AuthResult(None, reason)

"""Checking credentials without leaking which part was wrong.

An unknown user and a wrong password must look identical to the client: the
same reply, the same delay, and the same CPU work (a dummy hash verification),
so user names cannot be enumerated by timing.  Hash verification runs in a
thread pool: Argon2 takes tens of milliseconds of CPU and must never block the
event loop that serves every other session.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mailbag.auth.schemes import is_fast_scheme, verify_dummy, verify_password
from mailbag.auth.scram import ScramSecrets
from mailbag.auth.users import UserDatabase, UserRecord
from mailbag.errors import AuthError, InvalidUsername
from mailbag.logs import log_event
from mailbag.session.throttle import FailureThrottle


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


class Authenticator:
    """Verifies passwords and APOP digests with throttling and constant-time checks."""

    def __init__(
        self,
        users: UserDatabase,
        throttle: FailureThrottle,
        *,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.users = users
        self.throttle = throttle
        self._executor = executor if executor is not None else hash_pool()

    def _lookup(self, login: str) -> UserRecord | None:
        try:
            return self.users.lookup(login)
        except InvalidUsername:
            return None

    async def _run(self, func: object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)  # type: ignore[arg-type]

    async def check_password(self, login: str, password: str, address: str) -> AuthResult:
        """USER/PASS and SASL PLAIN."""
        await self._pre_delay(address, login)
        record = self._lookup(login)
        if record is None:
            await self._run(verify_dummy, password)
            return await self._failed(address, login, "unknown user")
        try:
            if is_fast_scheme(record.password):
                good = verify_password(password, record.password)
            else:
                good = bool(await self._run(verify_password, password, record.password))
        except AuthError as exc:
            log_event("auth-error", user=record.name, error=str(exc))
            return await self._failed(address, login, "unusable password hash")
        if not good:
            return await self._failed(address, login, "wrong password")
        self.throttle.record_success(address, login)
        return AuthResult(record.name, "ok")

    async def check_apop(
        self, login: str, timestamp: str, digest: str, address: str
    ) -> AuthResult:
        """APOP (RFC 1939 section 7): MD5 over timestamp and a retrievable secret.

        Only users with an ``apop`` secret can use it; for everyone else APOP
        fails exactly like a wrong password.
        """
        await self._pre_delay(address, login)
        record = self._lookup(login)
        secret = record.apop_secret if record is not None else None
        expected = hashlib.md5(
            (timestamp + (secret or "\x00no-secret")).encode(), usedforsecurity=False
        ).hexdigest()
        if record is None or secret is None or not hmac.compare_digest(expected, digest):
            reason = "unknown user" if record is None else "wrong digest"
            if record is not None and secret is None:
                reason = "no APOP secret"
            return await self._failed(address, login, reason)
        self.throttle.record_success(address, login)
        return AuthResult(record.name, "ok")

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
        await self._pre_delay(address, login)
        if user is None:
            return await self._failed(address, login, reason)
        self.throttle.record_success(address, login)
        return AuthResult(user, "ok")

    async def _pre_delay(self, address: str, login: str) -> None:
        delay = self.throttle.delay_before_check(address, login)
        if delay > 0:
            # Logged so an administrator can see guessing being slowed down (never the secret).
            log_event("throttled", peer=address, user=login, delay=round(delay, 3))
            await asyncio.sleep(delay)

    async def _failed(self, address: str, login: str, reason: str) -> AuthResult:
        self.throttle.record_failure(address, login)
        await asyncio.sleep(self.throttle.failure_delay())
        return AuthResult(None, reason)

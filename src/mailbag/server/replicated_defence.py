"""Login defence that holds across workers: each worker's state is a replica.

The login defence keeps its state behind two Protocols
(``session.defence_state``: ``FailureCounters`` and ``KnownNetworks``).  In a
worker, both are the ordinary local implementations (same reads, with no round
trip to another process) wrapped so that every change is also published to the
other workers through the supervisor (``server.shared_state``), and the changes
they publish are applied here.  So ten guesses spread over four workers count
as ten everywhere, exactly as in one process; a worker restarted after a crash
replays the supervisor's journal (failures within the failure window) and
reads the known-good file, which every worker writes with the same, complete
set of networks (atomic rename: the last writer wins, and all hold everything).

The authentication cache (``auth.cache``) is shared the same way: every worker
hashes under the supervisor's key (``WorkerLink``), so an entry made by one
worker is valid in all, and a client polling every few minutes pays Argon2 once
per ``auth.cache_ttl``, not once per worker it happens to land on.  What crosses
is the keyed hash, never the password.  Cache entries are relayed but not
journalled: a restarted worker starts with an empty cache (only a cost), and
they cannot push failure counters out of the bounded journal.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from mailbag.auth.cache import VerificationCache
from mailbag.server.shared_state import StateClient
from mailbag.session.defence_state import FailureCounters, KnownNetworks

ADD = "defence.failures"
RESET = "defence.reset"
KNOWN = "defence.known"
#: A known-good network remembered again within this many seconds is not re-announced.
REFRESH = 3600.0
CACHED = "auth.cached"
FORGOT = "auth.forgot"


def _later(coro: Coroutine[Any, Any, Any]) -> None:
    """Apply a change another worker published (appliers are plain callbacks)."""
    asyncio.get_running_loop().create_task(coro)


class ReplicatedCounters:
    """``FailureCounters`` kept in step with every other worker's."""

    def __init__(self, state: StateClient, local: FailureCounters) -> None:
        self._state = state
        self._local = local
        state.on_change(ADD, lambda window, *keys: _later(local.add(keys, float(window))))
        state.on_change(RESET, lambda key: _later(local.reset(str(key))))

    async def counts(self, keys: Sequence[str], window: float) -> list[int]:
        return await self._local.counts(keys, window)

    async def add(self, keys: Sequence[str], window: float) -> list[int]:
        self._state.publish(ADD, window, *keys)
        return await self._local.add(keys, window)

    async def reset(self, key: str) -> None:
        # Every login resets; most counters are zero.  One that is zero here is zero in
        # every replica (each failure reached them all), so there is nothing to tell; a
        # failure still in flight then outlives this reset, which can only keep a delay.
        if (await self._local.counts([key], math.inf))[0]:
            self._state.publish(RESET, key)
        await self._local.reset(key)


class ReplicatedKnownNetworks:
    """``KnownNetworks`` kept in step with every other worker's."""

    def __init__(self, state: StateClient, local: KnownNetworks) -> None:
        self._state = state
        self._local = local
        state.on_change(
            KNOWN,
            lambda account, network, ttl: _later(
                local.remember(str(account), str(network), float(ttl))
            ),
        )

    async def is_known(self, account: str, network: str, ttl: float) -> bool:
        return await self._local.is_known(account, network, ttl)

    async def remember(self, account: str, network: str, ttl: float) -> None:
        # Every login remembers its network.  Announced again (to every replica, this one
        # included) only once it is ``REFRESH`` old here: replicas stay in step, and an
        # entry may expire up to that much sooner than in one process.
        if not await self._local.is_known(account, network, min(ttl, REFRESH)):
            self._state.publish(KNOWN, account, network, ttl)
            await self._local.remember(account, network, ttl)

    async def close(self) -> None:
        await self._local.close()


class ReplicatedCache(VerificationCache):
    """A ``VerificationCache`` whose entries every worker shares (same key in all).

    A new one is built at every SIGHUP in every worker (each drops its cache);
    it takes over the appliers, so the replaced one receives nothing more.
    """

    def __init__(self, state: StateClient, ttl: float, *, max_entries: int, key: bytes) -> None:
        super().__init__(ttl, max_entries=max_entries, key=key)
        self._state = state
        state.on_change(CACHED, self._adopt)
        state.on_change(FORGOT, lambda account: VerificationCache.forget(self, str(account)))

    def remember(self, account: str, stored: str, password: str) -> None:
        if not self.enabled:
            return
        digest = self.digest(account, stored, password)
        self.install(account, digest, self.ttl)
        # Wall-clock expiry: the relay's delay does not lengthen the entry's life.
        self._state.publish(CACHED, account, digest.hex(), time.time() + self.ttl, journal=False)

    def forget(self, account: str) -> None:
        super().forget(account)
        self._state.publish(FORGOT, account, journal=False)

    def _adopt(self, account: object, digest: object, expires: object) -> None:
        if isinstance(account, str) and isinstance(digest, str) \
                and isinstance(expires, (int, float)):
            self.install(account, bytes.fromhex(digest), expires - time.time())

"""Known-good networks in memory, persisted to a small JSON file (the embedded default).

NIST SP 800-63B section 5.2.2 lets a verifier exempt, from its guessing
defence, the places a subscriber has authenticated from before.  This store
remembers, per account, the networks of its successful logins and when each
was last seen.  It implements ``session.defence_state.KnownNetworks``.

The file is state, not configuration:

- Written off the hot path: a login only marks the store dirty, and one
  write follows ``flush_delay`` seconds later (debounced) in a worker thread,
  atomically (temporary file, fsync, rename), mode 0600 (it lists who logs in
  from where).  A refresh of a network already known is written at most every
  ``refresh_interval``, so a polling client does not cause a write per login.
- Bounded: at most ``max_accounts`` accounts (least recently successful go
  first) and ``max_networks`` networks each (oldest go first); entries older
  than the TTL are dropped at every write.  A larger file is refused.
- A missing file is an empty store.  A corrupt, unreadable or oversized one
  is ignored with exactly one warning line (``known-good-state-ignored``) and
  replaced at the next write: losing it only means a few logins are delayed
  as from new networks, while refusing to start would lock everybody out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailbag.atomicfile import write_atomic
from mailbag.logs import log_event

FORMAT = "mailbag-known-good"
VERSION = 1
MAX_ACCOUNTS = 100_000
MAX_NETWORKS = 16
#: Refuse to read more than this: 100,000 accounts with a few networks is ~10 MB.
MAX_FILE_BYTES = 32 * 1024 * 1024
#: Seconds between a change and its write.
FLUSH_DELAY = 5.0
#: A network already known gets its last-seen time rewritten at most this often.
REFRESH_INTERVAL = 3600.0


class CorruptState(ValueError):
    """The state file exists but is not a state file we can use."""


def _parse(data: bytes) -> dict[str, dict[str, float]]:
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptState(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptState(f"not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise CorruptState(f"unsupported version {doc.get('version')!r}")
    accounts = doc.get("accounts")
    if not isinstance(accounts, dict):
        raise CorruptState("no accounts table")
    result: dict[str, dict[str, float]] = {}
    for account, networks in accounts.items():
        if not isinstance(networks, dict) or not all(
            isinstance(n, str) and isinstance(t, int | float) and not isinstance(t, bool)
            for n, t in networks.items()
        ):
            raise CorruptState("malformed entry")
        result[account] = {n: float(t) for n, t in networks.items()}
    return result


class KnownNetworksFile:
    """``KnownNetworks`` kept in memory and saved to ``path`` (None: memory only)."""

    def __init__(
        self,
        path: Path | None,
        *,
        clock: Callable[[], float] = time.time,
        flush_delay: float = FLUSH_DELAY,
        refresh_interval: float = REFRESH_INTERVAL,
        max_accounts: int = MAX_ACCOUNTS,
        max_networks: int = MAX_NETWORKS,
    ) -> None:
        self.path = path
        self._clock = clock
        self.flush_delay = flush_delay
        self.refresh_interval = refresh_interval
        self.max_accounts = max_accounts
        self.max_networks = max_networks
        self._accounts: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._ttl = 0.0  # the latest TTL the policy gave us, for pruning at write time
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None
        self._pending: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self._write_error: str | None = None
        if path is not None:
            self._load(path)

    def __repr__(self) -> str:
        return f"KnownNetworksFile({self.path}, accounts={len(self._accounts)})"

    def __len__(self) -> int:
        return len(self._accounts)

    # -- loading -----------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._ignore(path, f"cannot read it: {exc.strerror}")
            return
        if len(data) > MAX_FILE_BYTES:
            self._ignore(path, f"larger than {MAX_FILE_BYTES} octets")
            return
        try:
            accounts = _parse(data)
        except CorruptState as exc:
            self._ignore(path, str(exc))
            return
        # Least recently seen first, so the LRU order survives a restart.
        for account, networks in sorted(accounts.items(), key=lambda kv: max(kv[1].values(),
                                                                             default=0.0)):
            if networks:
                newest = sorted(networks.items(), key=lambda kv: kv[1])[-self.max_networks:]
                self._accounts[account] = dict(newest)
        while len(self._accounts) > self.max_accounts:
            self._accounts.popitem(last=False)

    @staticmethod
    def _ignore(path: Path, reason: str) -> None:
        log_event("known-good-state-ignored", logging.WARNING, path=str(path), reason=reason,
                  effect="starting with no known-good networks; the file is rewritten")

    # -- KnownNetworks ---------------------------------------------------------------

    async def is_known(self, account: str, network: str, ttl: float) -> bool:
        networks = self._accounts.get(account)
        if networks is None or ttl <= 0:
            return False
        seen = networks.get(network)
        return seen is not None and self._clock() - seen <= ttl

    async def remember(self, account: str, network: str, ttl: float) -> None:
        self._ttl = ttl
        if ttl <= 0:
            return
        now = self._clock()
        networks = self._accounts.get(account)
        if networks is None:
            networks = self._accounts[account] = {}
        self._accounts.move_to_end(account)
        previous = networks.pop(network, None)
        for name in [n for n, seen in networks.items() if now - seen > ttl]:
            del networks[name]
        networks[network] = now  # insertion order = age, newest last
        while len(networks) > self.max_networks:
            del networks[next(iter(networks))]
        while len(self._accounts) > self.max_accounts:
            self._accounts.popitem(last=False)
        if previous is None or now - previous > min(self.refresh_interval, ttl / 10):
            self._mark_dirty()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.flush()

    # -- writing -----------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        self._dirty = True
        if self.path is None or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.flush_delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        self._pending = asyncio.ensure_future(self.flush())

    def snapshot(self) -> dict[str, dict[str, int]]:
        """What the file would hold now: unexpired entries, times in whole seconds."""
        now, ttl = self._clock(), self._ttl
        result: dict[str, dict[str, int]] = {}
        for account, networks in self._accounts.items():
            kept = {n: round(t) for n, t in networks.items() if ttl <= 0 or now - t <= ttl}
            if kept:
                result[account] = kept
        return result

    async def flush(self) -> None:
        """Write the file now if anything changed (in a worker thread)."""
        path = self.path
        if path is None:
            return
        async with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            doc = {"format": FORMAT, "version": VERSION, "accounts": self.snapshot()}
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, _write, path, doc)
            except OSError as exc:
                self._dirty = True  # retried with the next change or at shutdown
                message = f"{exc.strerror or exc}"
                if message != self._write_error:  # one line per distinct problem
                    self._write_error = message
                    log_event("known-good-state-unwritable", logging.WARNING, path=str(path),
                              error=message)
            else:
                self._write_error = None


def _write(path: Path, doc: dict[str, Any]) -> None:
    data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    write_atomic(path, data + b"\n", mode=0o600)

"""The supervisor of ``mailbag serve`` with ``server.workers`` > 1: it runs workers, it serves none.

Why processes: one asyncio process uses one core, and Argon2 hashing, TLS
handshakes and RETR all compete on its one event loop.  The supervisor binds
every listening socket (as root if needed), drops privileges, then starts N
workers that each accept on the *same* inherited sockets: the kernel hands a
new connection to whichever worker calls ``accept`` first, so a busy worker
takes fewer (``bench/accept_balance.py`` measured this against one
``SO_REUSEPORT`` socket per worker: higher rate and a lower p99 tail; the
same sockets also keep working for the LMTP Unix socket and survive a
worker's death, since the supervisor holds them open).

Why fork+exec (``python -m mailbag serve`` with inherited descriptors) rather
than a bare ``fork``: a forked child would inherit the supervisor's event
loop, threads and locks in whatever state they were; an exec'd worker starts
clean, builds its own loop and reads the config like any server, and the
descriptors it needs are named in one environment variable (``WorkerSpec``).

Lifecycle: a worker that exits is logged and restarted at once; if it dies
again within ``STABLE_AFTER`` seconds of starting, each restart waits twice as
long as the one before (the second waits ``BACKOFF_FIRST``, up to ``BACKOFF_CAP``), so a crash
loop does not burn the machine.  A worker that fails before it ever reported
ready stops the whole server: that is a start-up error to show, not to retry.
SIGHUP is checked once here, then passed to every worker (each reloads like a
single process would: open sessions untouched).  SIGTERM is passed on too:
every worker drains with the configured grace; one still running
``KILL_AFTER`` seconds after its grace is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mailbag.logs import log_event
from mailbag.server.gate import SharedCounts
from mailbag.server.shared_state import StateServer

#: Environment variable that turns ``mailbag serve`` into worker N of a supervisor.
WORKER_ENV = "MAILBAG_WORKER"
#: A worker that ran this long before dying is restarted with no delay.
STABLE_AFTER = 10.0
#: First and largest delay before restarting a worker that keeps dying young.
BACKOFF_FIRST = 0.25
BACKOFF_CAP = 30.0
#: Seconds past the shutdown grace before a worker that has not exited is killed.
KILL_AFTER = 10.0


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening socket passed to workers: its descriptor and what it is for."""

    fd: int
    #: ``"pop3"``, ``"pop3s"``, ``"lmtp"`` or ``"lmtp-unix"``, plus the address, e.g.
    #: ``"pop3 127.0.0.1:1110"``; the worker builds the matching listener around it.
    role: str


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker is told at start (as JSON in ``$MAILBAG_WORKER``)."""

    number: int
    count: int
    sockets: tuple[InheritedSocket, ...]
    #: Descriptor of the shared connection table (``server.gate.SharedCounts``).
    counts_fd: int
    #: Descriptor of this worker's end of its state socketpair (``server.shared_state``).
    state_fd: int

    def to_env(self) -> str:
        """Serialise for ``$MAILBAG_WORKER``."""
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerSpec | None:
        """The spec this process was started with, or None when it is not a worker."""
        text = environ.get(WORKER_ENV)
        if not text:
            return None
        data = json.loads(text)
        return cls(
            number=int(data["number"]),
            count=int(data["count"]),
            sockets=tuple(InheritedSocket(int(s["fd"]), str(s["role"])) for s in data["sockets"]),
            counts_fd=int(data["counts_fd"]),
            state_fd=int(data["state_fd"]),
        )


@dataclass(slots=True)
class _Slot:
    number: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False
    ever_ready: bool = False
    quick_deaths: int = 0
    restarts: int = 0
    waiter: asyncio.Task[None] | None = field(default=None, repr=False)


def restart_delay(quick_deaths: int) -> float:
    """Seconds before restarting a worker that died young ``quick_deaths`` times in a row.

    The first death is restarted at once; only a worker that keeps dying waits,
    twice as long each time, up to ``BACKOFF_CAP``.
    """
    if quick_deaths <= 1:
        return 0.0
    return float(min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** min(quick_deaths - 2, 16)))


class WorkerStartError(Exception):
    """A worker exited before it was ever ready (a start-up error, not a crash to retry)."""


class Supervisor:
    """Starts, watches, restarts, reloads and stops the worker processes."""

    def __init__(
        self,
        *,
        count: int,
        command: Sequence[str],
        sockets: Sequence[InheritedSocket],
        counts: SharedCounts,
        state: StateServer,
        grace: Callable[[], float],
        env: Mapping[str, str] | None = None,
        on_worker_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.count = count
        self.command = list(command)
        self.sockets = tuple(sockets)
        self.counts = counts
        self.state = state
        self.grace = grace
        self.env = dict(os.environ if env is None else env)
        self.on_worker_exit = on_worker_exit
        self.slots = [_Slot(number) for number in range(1, count + 1)]
        self.stopping = False
        self.restarts = 0
        self._failed: asyncio.Future[Any] | None = None
        self._all_ready = asyncio.Event()
        state.register("supervisor.ready", self._worker_ready)

    # -- status --------------------------------------------------------------

    @property
    def running(self) -> int:
        """Workers alive now."""
        return sum(1 for s in self.slots if s.process is not None and s.process.returncode is None)

    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [s.process.pid for s in self.slots
                if s.process is not None and s.process.returncode is None]

    # -- starting ------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until all report ready (or one fails to start)."""
        self._failed = asyncio.get_running_loop().create_future()
        for slot in self.slots:
            await self._spawn(slot)
        ready = asyncio.ensure_future(self._all_ready.wait())
        await asyncio.wait([ready, self._failed], return_when=asyncio.FIRST_COMPLETED)
        if self._failed.done():
            ready.cancel()
            number = self._failed.result()
            raise WorkerStartError(
                f"worker {number} exited during start-up (its log lines above say why)"
            )
        log_event("workers-ready", workers=self.count, pids=",".join(map(str, self.pids())))

    def _worker_ready(self, number: int, pid: int) -> bool:
        for slot in self.slots:
            if slot.number == number and slot.process is not None and slot.process.pid == pid:
                slot.ready = slot.ever_ready = True
        if all(s.ever_ready for s in self.slots):
            self._all_ready.set()
        return True

    async def _spawn(self, slot: _Slot) -> None:
        self.counts.clear_row(slot.number - 1)
        theirs = self.state.connect_worker()
        spec = WorkerSpec(
            number=slot.number,
            count=self.count,
            sockets=self.sockets,
            counts_fd=self.counts.fd,
            state_fd=theirs.fileno(),
        )
        env = {**self.env, WORKER_ENV: spec.to_env()}
        fds = [s.fd for s in self.sockets] + [self.counts.fd, theirs.fileno()]
        try:
            slot.process = await asyncio.create_subprocess_exec(
                *self.command, pass_fds=fds, env=env, stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            theirs.close()
        slot.started = time.monotonic()
        slot.ready = False
        log_event("worker-started", number=slot.number, pid=slot.process.pid)
        slot.waiter = asyncio.get_running_loop().create_task(self._watch(slot, slot.process))

    async def _watch(self, slot: _Slot, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        lived = time.monotonic() - slot.started
        self.counts.clear_row(slot.number - 1)  # its connections died with it
        if self.on_worker_exit is not None:
            self.on_worker_exit(process.pid)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        if self.stopping:
            log_event("worker-stopped", number=slot.number, pid=process.pid, status=how)
            return
        if not slot.ever_ready:
            log_event("worker-failed", logging.ERROR, number=slot.number, pid=process.pid,
                      status=how, note="exited before it was ready")
            if self._failed is not None and not self._failed.done():
                self._failed.set_result(slot.number)
            return
        slot.quick_deaths = slot.quick_deaths + 1 if lived < STABLE_AFTER else 0
        delay = restart_delay(slot.quick_deaths)
        log_event("worker-died", logging.ERROR, number=slot.number, pid=process.pid,
                  status=how, lived=round(lived, 1), restart_in=delay)
        if delay:
            await asyncio.sleep(delay)
        if not self.stopping:
            slot.restarts += 1
            self.restarts += 1
            await self._spawn(slot)

    # -- signals -------------------------------------------------------------

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every running worker."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reload(self) -> None:
        """SIGHUP: every worker reloads (each logs ``reloaded`` or ``reload-failed``)."""
        self.signal_all(signal.SIGHUP)

    async def stop(self) -> None:
        """SIGTERM to every worker, wait for the drain, kill what outlives it."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        for slot in self.slots:  # a restart waiting out its back-off is simply dropped
            if slot.waiter is not None and slot.process is not None and (
                slot.process.returncode is not None
            ):
                slot.waiter.cancel()
        waiters = {s.waiter for s in self.slots if s.waiter is not None and not s.waiter.done()}
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=self.grace() + KILL_AFTER)
            if pending:
                log_event("worker-kill", logging.WARNING, pids=",".join(map(str, self.pids())),
                          note="still running after the shutdown grace")
                self.signal_all(signal.SIGKILL)
                await asyncio.wait(pending, timeout=5)
        await self.state.close()

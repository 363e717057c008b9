"""The parts of ``server.workers`` without processes: gate, shared state relay, config, back-off."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailbag.cli.config_template import render
from mailbag.config import config_from_dict, worker_count
from mailbag.errors import ConfigError
from mailbag.server.gate import LocalGate, SharedCounts, SharedGate
from mailbag.server.replicated_defence import (
    ReplicatedCache,
    ReplicatedCounters,
    ReplicatedKnownNetworks,
)
from mailbag.server.shared_state import StateClient, StateError, StateServer
from mailbag.server.supervisor import InheritedSocket, WorkerSpec, restart_delay
from mailbag.session.defence_state import MemoryFailureCounters
from mailbag.session.known_good import KnownNetworksFile


def test_local_gate_caps_total_and_per_address() -> None:
    gate = LocalGate()
    assert gate.admit("a", 3, 2) and gate.admit("a", 3, 2)
    assert not gate.admit("a", 3, 2)  # per address
    assert gate.admit("b", 3, 2)
    assert not gate.admit("c", 3, 2)  # total
    gate.release("a")
    assert gate.admit("c", 3, 2) and gate.total() == 3


def test_shared_gate_counts_over_rows_and_frees_a_dead_rows_places() -> None:
    counts = SharedCounts.create(2)
    try:
        one, two = SharedGate(counts, 0), SharedGate(SharedCounts.attach(counts.fd), 1)
        assert one.admit("10.0.0.1", 100, 2) and two.admit("10.0.0.1", 100, 2)
        assert not one.admit("10.0.0.1", 100, 2) and not two.admit("10.0.0.1", 100, 2)
        assert one.admit("10.0.0.2", 3, 2) and not two.admit("10.0.0.3", 3, 2)  # total 3
        counts.clear_row(1)  # worker 2 died: its place is free for everyone
        assert one.admit("10.0.0.1", 100, 2) and one.total() == 3
        one.release("10.0.0.1")
        assert counts.count(counts.columns_of("10.0.0.1")) == 1
    finally:
        counts.close()


def test_shared_gate_lock_excludes_another_process() -> None:
    counts = SharedCounts.create(2)
    try:
        code = (f"import time; from mailbag.server.gate import SharedCounts\n"
                f"c = SharedCounts.attach({counts.fd}); c.lock(); print('locked', flush=True)\n"
                f"time.sleep(0.5); c.unlock()")
        child = subprocess.Popen([sys.executable, "-c", code], pass_fds=[counts.fd],
                                 stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"locked\n"
        started = time.monotonic()
        assert SharedGate(counts, 0).admit("x", 10, 10)
        assert time.monotonic() - started > 0.3  # waited for the other process's check
        child.wait(timeout=10)
    finally:
        counts.close()


def test_state_relay_reaches_other_workers_and_replays_to_late_ones() -> None:
    async def scenario() -> None:
        server = StateServer()
        server.register("echo.twice", lambda x: x * 2)
        first, second = StateClient(server.connect_worker()), StateClient(server.connect_worker())
        await first.start()
        await second.start()
        counters = [ReplicatedCounters(c, MemoryFailureCounters()) for c in (first, second)]
        known = [ReplicatedKnownNetworks(c, KnownNetworksFile(None)) for c in (first, second)]
        assert await first.call("echo.twice", 21) == 42
        with pytest.raises(StateError):
            await first.call("os.system", "true")
        keys = ("addr:192.0.2.1", "acct:alice")
        await counters[0].add(keys, 60.0)
        await counters[0].add(keys, 60.0)
        await known[0].remember("alice", "192.0.2.0/24", 3600.0)
        await asyncio.sleep(0.1)
        assert await counters[1].counts(keys, 60.0) == [2, 2]  # the other worker sees them
        assert await known[1].is_known("alice", "192.0.2.0/24", 3600.0)
        await counters[1].reset("addr:192.0.2.1")
        await asyncio.sleep(0.1)
        assert await counters[0].counts(keys, 60.0) == [0, 2]
        late = StateClient(server.connect_worker())  # a worker restarted after a crash
        await late.start()
        replica = ReplicatedCounters(late, MemoryFailureCounters())
        await asyncio.sleep(0.1)
        assert await replica.counts(["acct:alice"], 60.0) == [2]  # replayed from the journal
        for client in (first, second, late):
            await client.close()
        await server.close()

    asyncio.run(scenario())


def test_a_login_on_a_quiet_account_publishes_nothing() -> None:
    # Every login resets counters and remembers its network: announcing no-ops would cost
    # every worker a message per login.  Only real changes are published.
    class Recorder:
        def __init__(self) -> None:
            self.sent: list[tuple[object, ...]] = []

        def on_change(self, name: str, apply: object) -> None:
            pass

        def publish(self, name: str, *args: object, journal: bool = True) -> None:
            self.sent.append((name, *args))

    async def scenario() -> None:
        state = Recorder()
        counters = ReplicatedCounters(state, MemoryFailureCounters())  # type: ignore[arg-type]
        known = ReplicatedKnownNetworks(state, KnownNetworksFile(None))  # type: ignore[arg-type]
        await counters.reset("acct:alice")  # nothing to reset
        await known.remember("alice", "192.0.2.0/24", 3600.0 * 24)
        await known.remember("alice", "192.0.2.0/24", 3600.0 * 24)  # already known: quiet
        assert state.sent == [("defence.known", "alice", "192.0.2.0/24", 3600.0 * 24)]
        await counters.add(["acct:alice"], 60.0)
        await counters.reset("acct:alice")
        assert state.sent[1:] == [("defence.failures", 60.0, "acct:alice"),
                                  ("defence.reset", "acct:alice")]
        assert await counters.counts(["acct:alice"], 60.0) == [0]

    asyncio.run(scenario())


def test_auth_cache_entries_are_shared_by_workers_but_not_journalled() -> None:
    async def scenario() -> None:
        server = StateServer()
        key = bytes(range(32))
        first, second = StateClient(server.connect_worker()), StateClient(server.connect_worker())
        await first.start()
        await second.start()
        caches = [ReplicatedCache(c, 300, max_entries=10, key=key) for c in (first, second)]
        caches[0].remember("alice", "{PLAIN}pw", "pw")
        await asyncio.sleep(0.1)
        assert caches[1].check("alice", "{PLAIN}pw", "pw")  # verified once, valid everywhere
        assert not caches[1].check("alice", "{PLAIN}pw", "guess")
        assert not caches[1].check("alice", "{PLAIN}new", "pw")  # a changed hash misses
        # Another key (a cache of another supervisor) cannot use the entry.
        stranger = StateClient(server.connect_worker())
        await stranger.start()
        other = ReplicatedCache(stranger, 300, max_entries=10, key=bytes(32))
        caches[0].remember("bob", "{PLAIN}b", "b")
        await asyncio.sleep(0.1)
        assert caches[1].check("bob", "{PLAIN}b", "b")
        assert not other.check("bob", "{PLAIN}b", "b")
        caches[1].forget("bob")
        await asyncio.sleep(0.1)
        assert not caches[0].check("bob", "{PLAIN}b", "b")
        late = StateClient(server.connect_worker())  # restarted: starts with an empty cache
        await late.start()
        replica = ReplicatedCache(late, 300, max_entries=10, key=key)
        await asyncio.sleep(0.1)
        assert len(replica) == 0 and not replica.check("alice", "{PLAIN}pw", "pw")
        for client in (first, second, stranger, late):
            await client.close()
        await server.close()

    asyncio.run(scenario())


def test_state_client_notices_a_gone_supervisor() -> None:
    async def scenario() -> None:
        server = StateServer()
        client = StateClient(server.connect_worker())
        await client.start()
        await server.close()
        await asyncio.wait_for(client.lost.wait(), 5)
        with pytest.raises(StateError):
            await client.call("supervisor.ready", 1, 2)

    asyncio.run(scenario())


def test_restart_delay_is_zero_at_first_then_doubles_to_a_cap() -> None:
    assert [restart_delay(n) for n in range(5)] == [0.0, 0.0, 0.25, 0.5, 1.0]
    assert restart_delay(40) == 30.0


def test_worker_spec_round_trips_through_the_environment() -> None:
    spec = WorkerSpec(2, 4, (InheritedSocket(5, "pop3 127.0.0.1:110"),), 7, 8)
    assert WorkerSpec.from_env({"MAILBAG_WORKER": spec.to_env()}) == spec
    assert WorkerSpec.from_env({}) is None


def test_server_workers_setting() -> None:
    assert config_from_dict({}).workers == 0  # "auto"
    assert worker_count(config_from_dict({})) >= 1
    assert config_from_dict({"server": {"workers": 3}}).workers == 3
    for bad in (0, -1, "many", True, 10_000):
        with pytest.raises(ConfigError, match=r"server\.workers"):
            config_from_dict({"server": {"workers": bad}})
    import tomllib

    documented = tomllib.loads(render(listen=("127.0.0.1:1110",), listen_tls=()))
    assert documented["server"]["workers"] == "auto"
    assert config_from_dict(documented, path=Path("/etc/mailbag/x.toml")).workers == 0
